//! `bdvmm`: parse the command line, build the VM, run it, map the outcome
//! to a documented exit status (see `exit_code.rs`).

use std::process::ExitCode;

use bdvmm::cli::{Cli, Command};
use bdvmm::config::VmConfig;
use bdvmm::exit_code::{BdvmmExit, MainError};
use bdvmm::vmm::Vmm;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match dispatch(cli.command) {
        Ok(code) => code.into(),
        // The refusal is the reply already printed.
        Err(e @ MainError::Refused) => e.exit().into(),
        Err(e) => {
            eprintln!("bdvmm: error: {}", backdoor_abi::ErrorChain(&e));
            e.exit().into()
        }
    }
}

fn dispatch(command: Command) -> Result<BdvmmExit, MainError> {
    match command {
        Command::Run(args) => run(*args),
        Command::Ctl(args) => ctl(&args),
        Command::Agent(args) => {
            // Runs until the process is killed.
            bdvmm::agent_process::run(&args)?;
            Ok(BdvmmExit::Ok)
        }
    }
}

/// One request, one reply line on stdout; exit 1 if the reply is an error.
fn ctl(args: &bdvmm::cli::CtlArgs) -> Result<BdvmmExit, MainError> {
    let reply = bdvmm::api::request(&args.api_sock, args.cmd.name()).map_err(MainError::Control)?;
    println!("{reply}");
    if reply["ok"] == true {
        Ok(BdvmmExit::Ok)
    } else {
        Err(MainError::Refused)
    }
}

/// Builds and runs the VM; a guest that stopped other than cleanly says why.
fn run(args: bdvmm::cli::RunArgs) -> Result<BdvmmExit, MainError> {
    let why = Vmm::new(VmConfig::try_from(args)?)?.run()?;
    let code = BdvmmExit::from(&why);
    if code != BdvmmExit::Ok {
        eprintln!(
            "bdvmm: guest stopped: {}",
            serde_json::to_string(&why).unwrap_or_default()
        );
    }
    Ok(code)
}
