//! CPU time of processes, from Linux `/proc/<pid>/stat`, for the benchmark's per-process figures.
//!
//! A process's figure includes its direct children that are not measured themselves (nginx's
//! master does nothing, its worker does the work; the benchmark, which spawned the whole stack,
//! is the load generator alone). Times are in clock ticks of 1/100 s: Linux reports `/proc`
//! times in `USER_HZ`, which is 100 on every architecture it supports.

use std::collections::HashMap;

/// `USER_HZ`: clock ticks per second in `/proc/<pid>/stat`.
const TICKS_PER_SEC: f64 = 100.0;

/// The parent pid and user + system CPU ticks from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) is in parentheses and may hold spaces or parentheses, so the
/// fields are counted from the last `)`.
#[must_use]
pub fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid (4), … utime (14), stime (15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU ticks used so far by each of `pids` and its direct children that are not in `pids`
/// (absent: exited).
#[must_use]
pub fn ticks(pids: &[u32]) -> HashMap<u32, u64> {
    let mut stats = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((ppid, t)) = parse_stat(&text) else {
            continue;
        };
        stats.push((pid, ppid, t));
    }
    attribute(&stats, pids)
}

/// Ticks per measured pid from `(pid, ppid, ticks)` rows: its own, plus those of its direct
/// children that are not measured themselves (counted once, under their own pid).
fn attribute(stats: &[(u32, u32, u64)], pids: &[u32]) -> HashMap<u32, u64> {
    let mut own: HashMap<u32, u64> = HashMap::new();
    let mut children: HashMap<u32, u64> = HashMap::new();
    for &(pid, ppid, t) in stats {
        if pids.contains(&pid) {
            *own.entry(pid).or_default() += t;
        } else if pids.contains(&ppid) {
            *children.entry(ppid).or_default() += t;
        }
    }
    for (pid, t) in children {
        if let Some(o) = own.get_mut(&pid) {
            *o += t;
        }
    }
    own
}

/// Share of one core used between two readings `secs` apart (1.0 = one core busy).
#[must_use]
pub fn cores(before: u64, after: u64, secs: f64) -> f64 {
    after.saturating_sub(before) as f64 / TICKS_PER_SEC / secs.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_from_the_last_parenthesis() {
        let stat =
            "4242 (tokio-rt (x) 1) S 17 4242 17 0 -1 4194560 1 0 0 0 250 75 0 0 20 0 9 0 100 1 1";
        assert_eq!(parse_stat(stat), Some((17, 325)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (init) S"), None);
    }

    #[test]
    fn a_measured_child_is_counted_once_under_its_own_pid() {
        // The benchmark (1) spawned nginx (2, whose worker is 3) and a gateway (4).
        let stats = [(1, 0, 10), (2, 1, 1), (3, 2, 50), (4, 1, 40), (5, 99, 7)];
        let got = attribute(&stats, &[1, 2, 4]);
        assert_eq!(got.get(&1), Some(&10), "the load generator alone");
        assert_eq!(got.get(&2), Some(&51), "nginx with its worker");
        assert_eq!(got.get(&4), Some(&40));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn this_process_has_a_cpu_time_and_cores_are_ticks_per_second() {
        let me = std::process::id();
        // Burn a little CPU so the figure is not zero on a fast machine.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(ticks(&[me]).contains_key(&me));
        assert!((cores(100, 300, 2.0) - 1.0).abs() < 1e-9);
        assert_eq!(cores(300, 100, 1.0), 0.0);
    }
}
