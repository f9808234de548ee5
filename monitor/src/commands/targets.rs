//! `bdctl targets add|rm|ls`: a cluster's targets, registered in etcd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::cli::{load_config, TargetsAddArgs, TargetsCommand};
use crate::cluster::{incident, ResumeRecord, TargetRecord};
use crate::target::Target;
use crate::Error;

/// `bdctl targets ...`.
pub fn run(cmd: &TargetsCommand) -> Result<(), Error> {
    match cmd {
        TargetsCommand::Add(a) => add(a),
        TargetsCommand::Rm { etcd, names } => {
            let etcd = etcd.connect()?;
            for n in names {
                if etcd.delete(&format!("targets/{n}"))? {
                    println!("bdctl: removed target {n}");
                } else {
                    return Err(Error::Usage(format!("no target {n} is registered")));
                }
            }
            Ok(())
        }
        TargetsCommand::Ls { etcd, json } => ls(&etcd.connect()?, *json),
    }
}

/// A path as every monitor will read it: absolute.
fn absolute(p: &Path) -> Result<PathBuf, Error> {
    std::path::absolute(p).map_err(|e| Error::Usage(format!("{}: {e}", p.display())))
}

fn add(a: &TargetsAddArgs) -> Result<(), Error> {
    let mut records = Vec::new();
    let resume = match &a.resume_to {
        Some(to) => {
            let keys = a
                .resume_key_file
                .as_ref()
                .or(a.key_file.as_ref())
                .ok_or_else(|| Error::Usage("give --resume-key-file (or --key-file)".into()))?;
            Target::parse(to, keys)?; // checks the spec and the key file here
            Some(ResumeRecord {
                target: to.clone(),
                key_file: absolute(keys)?,
                hook: a.resume_hook.clone(),
                slot_size: a.resume_slot_size,
                service: a.resume_service.clone(),
            })
        }
        None => None,
    };
    for spec in &a.targets {
        let keys = a
            .key_file
            .as_ref()
            .ok_or_else(|| Error::Usage("give --key-file for the targets".into()))?;
        Target::parse(spec, keys)?;
        records.push(TargetRecord {
            target: spec.clone(),
            key_file: absolute(keys)?,
            transport: a.transport,
            resume: resume.clone(),
        });
    }
    if let Some(path) = &a.config {
        let file = load_config(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for t in &file.targets {
            let keys = t
                .key_file
                .as_deref()
                .or(file.key_file.as_deref())
                .map(|k| base.join(k))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "no key file for target {} (set key_file)",
                        t.target
                    ))
                })?;
            Target::parse(&t.target, &keys)?;
            records.push(TargetRecord {
                target: t.target.clone(),
                key_file: absolute(&keys)?,
                transport: t.transport.or(file.transport),
                resume: None,
            });
        }
    }
    if records.is_empty() {
        return Err(Error::Usage(
            "no targets: give NAME@HOST:PORT or --config".into(),
        ));
    }
    for r in &records {
        crate::cluster::check_name(r.name()).map_err(Error::Usage)?;
    }
    let etcd = a.etcd.connect()?;
    for r in &records {
        let v = serde_json::to_vec(r).map_err(|e| Error::Other(e.to_string()))?;
        etcd.put(&format!("targets/{}", r.name()), v, None)?;
    }
    println!("bdctl: registered {} targets", records.len());
    Ok(())
}

fn ls(etcd: &crate::cluster::Etcd, as_json: bool) -> Result<(), Error> {
    let owners: BTreeMap<String, String> = etcd
        .list("owners/")?
        .into_iter()
        .filter_map(|kv| {
            let n = kv.key.strip_prefix("owners/")?.to_owned();
            Some((n, String::from_utf8_lossy(&kv.value).into_owned()))
        })
        .collect();
    let mut open: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for i in incident::list(etcd)? {
        if i.state == incident::State::Open {
            open.entry(i.target).or_default().push(i.generation);
        }
    }
    let mut rows = Vec::new();
    for kv in etcd.list("targets/")? {
        let name = kv
            .key
            .strip_prefix("targets/")
            .unwrap_or(&kv.key)
            .to_owned();
        // Why no monitor watches it (the ownership loop skips it too).
        let rec = serde_json::from_slice::<TargetRecord>(&kv.value)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                crate::cluster::check_name(&name)?;
                if r.name() == name {
                    Ok(r)
                } else {
                    Err(format!("its record names target {:?}", r.name()))
                }
            });
        rows.push(json!({
            "name": name,
            "record": rec.as_ref().ok(),
            "error": rec.as_ref().err(),
            "owner": owners.get(&name),
            "open_incidents": open.get(&name).cloned().unwrap_or_default(),
        }));
    }
    if as_json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<20} {:<28} {:<20} OPEN INCIDENTS",
        "TARGET", "AGENT", "OWNER"
    );
    for r in rows {
        let agent = r["record"]["target"]
            .as_str()
            .and_then(|t| t.split_once('@'))
            .map_or_else(
                || format!("bad record: {}", r["error"].as_str().unwrap_or("?")),
                |(_, a)| a.to_owned(),
            );
        println!(
            "{:<20} {:<28} {:<20} {}",
            r["name"].as_str().unwrap_or("?"),
            agent,
            r["owner"].as_str().unwrap_or("(none)"),
            r["open_incidents"]
        );
    }
    Ok(())
}
