//! `bdvmm`: parse the command line, build the VM, run it, map the outcome
//! to a documented exit status (see `exit_code.rs`).

use std::process::ExitCode;

use bdvmm::cli::{Cli, Command};
use bdvmm::config::VmConfig;
use bdvmm::exit_code::BdvmmExit;
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
    match cli.command {
        Command::Run(args) => run(args).into(),
        Command::Ctl(args) => ctl(args).into(),
        Command::Agent(args) => agent(args).into(),
    }
}

/// The separate agent: waits for one VMM, then serves its guest RAM for
/// as long as it runs (SIGTERM or SIGKILL ends it).
fn agent(args: bdvmm::cli::AgentArgs) -> BdvmmExit {
    match bdvmm::agent_process::run(&args) {
        Ok(()) => BdvmmExit::Ok,
        Err(e) => {
            eprintln!("bdvmm agent: error: {e}");
            BdvmmExit::Error
        }
    }
}

/// One request, one reply line on stdout; exit 1 if the reply is an error.
fn ctl(args: bdvmm::cli::CtlArgs) -> BdvmmExit {
    match bdvmm::api::request(&args.api_sock, args.cmd.name()) {
        Ok(reply) => {
            println!("{reply}");
            if reply["ok"] == true {
                BdvmmExit::Ok
            } else {
                BdvmmExit::Error
            }
        }
        Err(e) => {
            eprintln!("bdvmm: error: {e}");
            BdvmmExit::Error
        }
    }
}

fn run(args: bdvmm::cli::RunArgs) -> BdvmmExit {
    let result = VmConfig::try_from(args)
        .map_err(|e| e.to_string())
        .and_then(|config| Vmm::new(config).map_err(|e| e.to_string()))
        .and_then(|vmm| vmm.run().map_err(|e| e.to_string()));
    match result {
        Ok(why) => {
            let code = BdvmmExit::from(&why);
            if code != BdvmmExit::Ok {
                eprintln!(
                    "bdvmm: guest stopped: {}",
                    serde_json::to_string(&why).unwrap_or_default()
                );
            }
            code
        }
        Err(e) => {
            eprintln!("bdvmm: error: {e}");
            BdvmmExit::Error
        }
    }
}
