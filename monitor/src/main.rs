//! `bdctl`: parse, run one command, map the outcome to an exit status:
//! 0 success, 1 error, 2 usage, 3 a hang was detected (`watch --exit-on-hang`).

use std::process::ExitCode;

use bdctl::cli::{Cli, Command};
use bdctl::watch::{self, WatchEnd};
use bdctl::{commands, Error};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every command mostly waits for replies: on the guest's own host a
    // woken bdctl should preempt a vCPU that holds the core, not wait out
    // its slice (threads spawned later inherit this).
    backdoor_proto::latency::prefer_short_slices();
    let result = match cli.command {
        Command::Watch(a) => a
            .resolve()
            .map_err(Error::from)
            .and_then(|(jobs, opts)| {
                watch::watch(jobs, &opts)
                    .map_err(|e| Error::Other(backdoor_abi::ErrorChain(&e).to_string()))
            })
            .map(|end| u8::from(end == WatchEnd::Hang) * 3),
        Command::Extract(a) => commands::extract::run(&a).map(|_| 0),
        Command::Resume(a) => commands::resume::run(&a).map(|_| 0),
        Command::Status(a) => commands::status::run(&a).map(|()| 0),
        Command::Read(a) => commands::read::run(&a).map(|()| 0),
        Command::Write(a) => commands::write::run(&a).map(|()| 0),
        Command::Cas(a) => commands::cas::run(&a).map(|()| 0),
        Command::Doctor(a) => commands::doctor::run(&a).map(|()| 0),
        Command::Dmesg(a) => commands::dmesg::run(&a).map(|()| 0),
        Command::Evidence(a) => commands::evidence::run(&a).map(|()| 0),
        Command::Targets(a) => commands::targets::run(&a).map(|()| 0),
        Command::Incidents(a) => commands::incidents::run(&a).map(|()| 0),
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
