//! `bdctl`: parse, run one command, map the outcome to an exit status:
//! 0 success, 1 error, 2 usage, 3 a hang was detected (`watch --exit-on-hang`).

use std::process::ExitCode;

use bdctl::cli::{Cli, Command};
use bdctl::watch::{self, WatchEnd};
use bdctl::{commands, kernel_commands, Error};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Watch(a) => a
            .resolve()
            .map_err(Error::from)
            .and_then(|(targets, opts)| {
                watch::watch(targets, &opts).map_err(|e| Error::Other(e.to_string()))
            })
            .map(|end| u8::from(end == WatchEnd::Hang) * 3),
        Command::Extract(a) => commands::extract(&a).map(|_| 0),
        Command::Resume(a) => commands::resume(&a).map(|_| 0),
        Command::Status(a) => commands::status(&a).map(|()| 0),
        Command::Read(a) => commands::read(&a).map(|()| 0),
        Command::Write(a) => commands::write(&a).map(|()| 0),
        Command::Cas(a) => commands::cas(&a).map(|()| 0),
        Command::Doctor(a) => commands::doctor(&a).map(|()| 0),
        Command::Dmesg(a) => kernel_commands::dmesg(&a).map(|()| 0),
        Command::Evidence(a) => kernel_commands::evidence(&a).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("bdctl: error: {}", backdoor_abi::ErrorChain(&e));
            ExitCode::from(
                if matches!(e, Error::Usage(_) | Error::Config(_) | Error::Target(_)) {
                    2
                } else {
                    1
                },
            )
        }
    }
}
