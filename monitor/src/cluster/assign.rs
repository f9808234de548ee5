//! Which live monitor owns which target: every monitor computes the same
//! answer from the same lists, so ownership needs no negotiation, only
//! the claim (a key created under the owner's lease) that makes it
//! exclusive while lists disagree.
//!
//! Rendezvous hashing with bounded loads: each target goes to the monitor
//! that ranks it highest among those with room (floor(targets / monitors),
//! and targets mod monitors of them one more), so loads differ by at most
//! one and a monitor joining or leaving moves few targets.

use std::collections::BTreeMap;

/// FNV-1a, finished with splitmix64's mixer: stable across processes and
/// builds (std's hasher is neither), and well spread for short names.
fn rank(monitor: &str, target: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in monitor.bytes().chain([0]).chain(target.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Target -> monitor, for every target, given the live monitors (empty if
/// there are none).
pub fn plan<'a>(targets: &[&'a str], monitors: &[&'a str]) -> BTreeMap<&'a str, &'a str> {
    let mut out = BTreeMap::new();
    if monitors.is_empty() {
        return out;
    }
    let mut targets = targets.to_vec();
    targets.sort_unstable();
    targets.dedup();
    // Every monitor takes `floor` targets, and `extra` of them one more:
    // loads differ by at most one (a plain ceiling for all would let the
    // last monitors fall short by more).
    let floor = targets.len() / monitors.len();
    let mut extra = targets.len() % monitors.len();
    let mut load: BTreeMap<&str, usize> = monitors.iter().map(|m| (*m, 0)).collect();
    for t in targets {
        let mut ranked: Vec<&str> = monitors.to_vec();
        ranked.sort_unstable_by_key(|m| (std::cmp::Reverse(rank(m, t)), *m));
        let pick = ranked
            .into_iter()
            .find(|m| load[m] < floor || (load[m] == floor && extra > 0));
        if let Some(m) = pick {
            let l = load.get_mut(m).expect("every monitor has a load");
            if *l == floor {
                extra -= 1;
            }
            *l += 1;
            out.insert(t, m);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn loads<'a>(p: &BTreeMap<&'a str, &'a str>) -> BTreeMap<&'a str, usize> {
        let mut l = BTreeMap::new();
        for m in p.values() {
            *l.entry(*m).or_default() += 1;
        }
        l
    }

    #[test]
    fn every_target_gets_one_monitor_and_loads_differ_by_at_most_one() {
        for (nt, nm) in [(12, 3), (1000, 3), (7, 2), (2, 5), (0, 3)] {
            let t = names("shop", nt);
            let m = names("mon", nm);
            let tr: Vec<&str> = t.iter().map(String::as_str).collect();
            let mr: Vec<&str> = m.iter().map(String::as_str).collect();
            let p = plan(&tr, &mr);
            assert_eq!(p.len(), nt);
            let l = loads(&p);
            let (lo, hi) = (
                mr.iter()
                    .map(|m| l.get(m).copied().unwrap_or(0))
                    .min()
                    .unwrap(),
                mr.iter()
                    .map(|m| l.get(m).copied().unwrap_or(0))
                    .max()
                    .unwrap(),
            );
            assert!(hi - lo <= 1, "{nt} targets on {nm} monitors: {l:?}");
        }
    }

    #[test]
    fn the_answer_does_not_depend_on_the_order_of_the_lists() {
        let t = names("vm", 50);
        let m = names("mon", 4);
        let mut tr: Vec<&str> = t.iter().map(String::as_str).collect();
        let mut mr: Vec<&str> = m.iter().map(String::as_str).collect();
        let a = plan(&tr, &mr);
        tr.reverse();
        mr.reverse();
        assert_eq!(a, plan(&tr, &mr));
    }

    #[test]
    fn a_monitor_leaving_moves_its_own_targets_and_few_others() {
        let t = names("vm", 300);
        let m = names("mon", 3);
        let tr: Vec<&str> = t.iter().map(String::as_str).collect();
        let mr: Vec<&str> = m.iter().map(String::as_str).collect();
        let before = plan(&tr, &mr);
        let after = plan(&tr, &mr[..2]);
        let moved_elsewhere = tr
            .iter()
            .filter(|t| before[*t] != "mon2" && before[*t] != after[*t])
            .count();
        assert!(after.values().all(|m| *m != "mon2"));
        // The survivors' own targets mostly stay (bounded loads move some).
        assert!(moved_elsewhere < 100, "{moved_elsewhere} of 200 moved");
    }

    #[test]
    fn no_monitor_no_owner() {
        assert!(plan(&["a", "b"], &[]).is_empty());
    }
}
