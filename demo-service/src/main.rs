//! `bdkv`: parse, run, map the outcome to an exit status (0 ok, 1 error,
//! 2 usage; `client` and `check` exit 1 when a reply was not OK).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backdoor_guest::{Counter, Device, HostConfig, Inbox, Level};
use bdkv::cli::{Cli, Command, ServeArgs};
use bdkv::store::Store;
use bdkv::{adopt, client, server};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = &mut std::io::stdout();
    let result = match cli.command {
        Command::Serve(a) => serve(&a),
        Command::Client(a) => input(a.script.as_deref()).and_then(|i| {
            client::script(a.server.addr, i, stdout)
                .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
                .map(|ok| u8::from(!ok))
        }),
        Command::Load(a) => client::load(a.server.addr, a.sessions, a.commands, stdout)
            .map(|()| 0)
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string()),
        Command::Check(a) => input(a.expect.as_deref()).and_then(|i| {
            client::check(a.server.addr, i, stdout)
                .map(|_| 0)
                .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
        }),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("bdkv: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn input(path: Option<&std::path::Path>) -> Result<Box<dyn BufRead>, String> {
    Ok(match path {
        Some(p) => Box::new(BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    })
}

fn serve(a: &ServeArgs) -> Result<u8, String> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BDKV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let dev = match &a.state_file {
        Some(p) => Device::host(
            p,
            &HostConfig {
                counters: a.max_sessions + 8,
                slots: a.max_sessions * 2,
                slot_size: a.host_slot_size,
                inbox_slots: 16,
                inbox_slot_size: a.host_inbox_slot_size,
            },
        ),
        None => Device::open_path(&a.device),
    }
    .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
    let app =
        Counter::alloc(&dev, &a.service, a.app_deadline_ms, Level::Application).map_err(|e| {
            format!(
                "the application counter: {e}",
                e = backdoor_abi::ErrorChain(&e)
            )
        })?;
    let (mut store, notes) = Store::open(
        dev.clone(),
        &a.service,
        a.max_sessions,
        a.session_deadline_ms,
    )
    .map_err(|e| {
        format!(
            "service area {:?}: {e}",
            a.service,
            e = backdoor_abi::ErrorChain(&e)
        )
    })?;
    for n in &notes {
        tracing::warn!("{n}");
    }
    tracing::info!(
        "{}: service {:?}, {} sessions resumed from its own area",
        dev.describe(),
        a.service,
        store.len()
    );
    for f in &a.resume_from {
        // A bad hand-off file must not stop the sessions this instance has.
        match adopt::from_file(&mut store, f) {
            Ok(r) => tracing::info!(
                "{}: {} sessions adopted, {} updated, {} already held, {} rejected, {} of other services",
                f.display(), r.new, r.updated, r.current, r.rejected, r.foreign
            ),
            Err(e) => tracing::error!(
                "{e}; no sessions adopted from it",
                e = backdoor_abi::ErrorChain(&e)
            ),
        }
    }
    let inbox = if a.inbox {
        let inbox = Inbox::map(&dev)
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?
            .ok_or_else(|| format!("{} has no inbox", dev.describe()))?;
        let mut fences = backdoor_guest::FenceBook::default();
        let r = adopt::from_inbox(&mut store, &inbox, &mut fences);
        tracing::info!(
            "inbox ({} slots of {} bytes): {} delivered, {} adopted",
            inbox.capacity(),
            inbox.slot_size(),
            inbox.delivered(),
            r.new + r.updated
        );
        Some((inbox, fences))
    } else {
        None
    };
    let listener = std::net::TcpListener::bind(a.listen)
        .map_err(|e| format!("listen on {}: {e}", a.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
    let mut out = std::io::stdout();
    // Scripts and tests wait for this line (and learn the port from it).
    writeln!(out, "bdkv listening on {addr}")
        .and_then(|()| out.flush())
        .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
    let tick = Duration::from_millis(u64::from(a.app_deadline_ms / 4).max(1));
    server::run(Arc::new(Mutex::new(store)), listener, app, inbox, tick)
        .map(|()| 0)
        .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
}
