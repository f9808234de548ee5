//! Section 7 (the lab's): bdctl's READ over RDMA verbs against the
//! device's own `ib_read_lat` (perftest) on the same device, and against
//! the soft backend, all in the same run. It needs an RDMA device and a
//! bdbench built with `--features verbs`: in the lab (`make bench` runs it
//! there, tests/lab/lab.sh) that is Soft-RoCE inside the L1 VM, where
//! absolute figures mean little (everything is emulated) and the ratios
//! are the result.

use crate::report::Section;
use crate::Ctx;

/// RDMA devices of this host.
pub fn devices() -> Vec<String> {
    std::fs::read_dir("/sys/class/infiniband")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs section 7.
pub fn run(ctx: &Ctx) -> Section {
    let mut sec = Section::new(
        7,
        "rdma",
        "Remote reads over RDMA verbs (the lab: Soft-RoCE)",
        "A real agent with the verbs backend serves fake guest RAM (a memfd with a 64-KiB \
         progress box); one monitor connection (bdctl's own client) times 8-B READs as RDMA \
         READ work requests (the verbs data path), then the same READs over the soft backend \
         on loopback TCP. Baseline, same run: perftest's ib_read_lat between two queue pairs \
         on the same device (8-B RDMA READs, the device's own floor). Inside the lab \
         everything runs under QEMU's software emulator: the ratios are the result, not the \
         microseconds.",
    );
    let n = if ctx.quick { 300 } else { 2000 };
    let devs = devices();
    let Some(device) = devs.first().cloned() else {
        sec.notes.push(
            "Not measured: no RDMA device here (/sys/class/infiniband is absent); `make bench` \
             runs this section in the lab."
                .into(),
        );
        return sec;
    };
    #[cfg(not(feature = "verbs"))]
    {
        let _ = (n, device);
        sec.notes.push(format!(
            "Not measured: devices {devs:?} exist, but bdbench was built without `--features verbs`."
        ));
    }
    #[cfg(feature = "verbs")]
    measure::run(ctx, &mut sec, &device, n);
    sec
}

#[cfg(feature = "verbs")]
mod measure {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use backdoor_abi::HookKind;
    use serde_json::json;

    use crate::plot::Series;
    use crate::report::{Figure, Section};
    use crate::stats::Dist;
    use crate::Ctx;
    use bdvmm_tests::fake_guest::{self, hook};

    /// The IPv4 address of the netdev under `device` (Soft-RoCE's), for
    /// perftest's client to connect to.
    fn device_ipv4(device: &str) -> Option<String> {
        let dir = format!("/sys/class/infiniband/{device}/device/net");
        let netdev = std::fs::read_dir(&dir)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .or_else(|| {
                // rxe has no device/ link: its parent netdev is in the ports' GIDs' ndevs.
                std::fs::read_to_string(format!(
                    "/sys/class/infiniband/{device}/ports/1/gid_attrs/ndevs/1"
                ))
                .ok()
                .map(|s| s.trim().to_owned())
            })?;
        let out = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", &netdev])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next().map(str::to_owned))
    }

    /// `ib_read_lat` on loopback: server and client on `device`, `n` READs of
    /// `size` bytes; its typical and 99th-percentile latency in µs.
    fn ib_read_lat(device: &str, size: usize, n: usize) -> Result<(f64, f64), String> {
        let ip =
            device_ipv4(device).ok_or_else(|| format!("no IPv4 address on {device}'s netdev"))?;
        let port = bdvmm_tests::free_port().to_string();
        let common = |c: &mut Command| {
            c.args(["-d", device, "-s", &size.to_string(), "-n", &n.to_string()])
                .args(["-p", &port, "-x", "1", "-F"])
                .stdin(Stdio::null());
        };
        let mut server = Command::new("ib_read_lat");
        common(&mut server);
        let mut server = server
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run ib_read_lat (perftest): {e}"))?;
        // The server listens once it has opened the device.
        std::thread::sleep(Duration::from_millis(1500));
        let mut client = Command::new("ib_read_lat");
        common(&mut client);
        let out = client.arg(&ip).output();
        let _ = server.kill();
        let _ = server.wait();
        let out = out.map_err(|e| format!("ib_read_lat client: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // " #bytes #iterations t_min[usec] t_max[usec] t_typical[usec] t_avg[usec] t_stdev[usec] 99% percentile[usec] 99.9% ..."
        let row: Vec<f64> = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&size.to_string()[..]))
            .ok_or_else(|| format!("no result row in ib_read_lat's output:\n{text}"))?
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match row[..] {
            [_, _, _, _, typical, _, _, p99, ..] => Ok((typical, p99)),
            _ => Err(format!("unexpected ib_read_lat row {row:?}")),
        }
    }

    fn lat(d: &Dist) -> String {
        format!("p50 {:.1} µs, p99 {:.1} µs", d.p50, d.p99)
    }

    /// Measures on `device` into `sec`.
    pub(super) fn run(ctx: &Ctx, sec: &mut Section, device: &str, n: usize) {
        let mem = fake_guest::ram(1 << 20);
        let verbs = backdoor_agent::verbs::VerbsBackend::open(mem.clone(), Some(device))
            .expect("open the RDMA device for the agent");
        let agent = fake_guest::agent(
            mem,
            vec![hook(1, 0, 64 << 10, HookKind::ProgressBox, "progress")],
            None,
        );
        let addr = fake_guest::start(agent.with_verbs(std::sync::Arc::new(verbs)));
        let mut soft = fake_guest::connect(addr);
        let mut verbs = fake_guest::connect(addr);
        verbs
            .attach_verbs(Some(device))
            .expect("connect a queue pair to the agent");
        assert_eq!(verbs.data_path(), "verbs");
        let over_verbs = Dist::new(fake_guest::read_rtt_us(&mut verbs, n));
        let over_soft = Dist::new(fake_guest::read_rtt_us(&mut soft, n));
        let floor = ib_read_lat(device, 8, n);
        let mut fig = Figure::plain(
            "READ 8 B over verbs",
            over_verbs.p50,
            "µs",
            lat(&over_verbs),
        );
        match &floor {
            Ok((typical, p99)) => {
                fig = fig.against(
                    "ib_read_lat 8 B (typical)",
                    *typical,
                    format!("typical {typical:.1} µs, p99 {p99:.1} µs"),
                );
            }
            Err(e) => sec.notes.push(format!("ib_read_lat baseline failed: {e}")),
        }
        sec.figures = vec![
            fig.headline(),
            Figure::plain(
                "READ 8 B over verbs",
                over_verbs.p50,
                "µs",
                lat(&over_verbs),
            )
            .against(
                "READ 8 B over the soft backend (loopback TCP)",
                over_soft.p50,
                lat(&over_soft),
            ),
        ];
        sec.notes.push(format!("Device: {device}."));
        ctx.cdf_plot(
            sec,
            "rdma_cdf.svg",
            "8-B READ latency: verbs vs soft (same run)",
            "round-trip latency (µs)",
            &[
                Series {
                    label: "bdctl READ over verbs",
                    sorted: &over_verbs.sorted,
                },
                Series {
                    label: "bdctl READ over soft",
                    sorted: &over_soft.sorted,
                },
            ],
        );
        sec.details = json!({
            "device": device, "verbs_read_8b_us": over_verbs, "soft_read_8b_us": over_soft,
            "ib_read_lat_8b_us": floor.as_ref().ok().map(|(t, p)| json!({"typical": t, "p99": p})),
        });
    }
}
