//! Reading a process' memory and file-descriptor limit from Linux `/proc`.
//!
//! `conn-memory` compares a gateway's resident set before and after opening sockets, and must
//! know up front whether the gateway (and itself) may hold that many descriptors at all, since
//! a refused `accept` looks like a slow server rather than a limit.

/// Resident-set figures of a process, KiB, from `/proc/PID/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`: everything resident.
    pub total_kib: u64,
    /// `RssAnon`: the heap and stacks, which is where per-connection state lands.
    pub anon_kib: u64,
}

impl Rss {
    /// Parses the text of `/proc/PID/status`; `None` when `VmRSS` is missing (a kernel thread,
    /// or a process that already exited).
    #[must_use]
    pub fn parse(status: &str) -> Option<Self> {
        Some(Self {
            total_kib: kib_field(status, "VmRSS:")?,
            anon_kib: kib_field(status, "RssAnon:").unwrap_or(0),
        })
    }
}

fn kib_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

/// One resource limit: `None` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// The `Max open files` limit from the text of `/proc/PID/limits`.
#[must_use]
pub fn open_files_limit(limits: &str) -> Option<Limit> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut words = line["Max open files".len()..].split_whitespace();
    let value = |w: Option<&str>| -> Option<Option<u64>> {
        match w? {
            "unlimited" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    Some(Limit {
        soft: value(words.next())?,
        hard: value(words.next())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcolloquy-gatewa\nVmPeak:\t  812345 kB\nVmRSS:\t   23456 kB\nRssAnon:\t   12000 kB\nRssFile:\t   11456 kB\nThreads:\t5\n";

    #[test]
    fn rss_comes_from_vmrss_and_rssanon() {
        assert_eq!(
            Rss::parse(STATUS),
            Some(Rss {
                total_kib: 23_456,
                anon_kib: 12_000
            })
        );
    }

    #[test]
    fn a_status_without_vmrss_has_no_rss() {
        assert_eq!(Rss::parse("Name:\tkthreadd\nThreads:\t1\n"), None);
        assert_eq!(Rss::parse("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn open_files_limit_reads_soft_and_hard() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(
            open_files_limit(limits),
            Some(Limit {
                soft: Some(1_024),
                hard: Some(524_288)
            })
        );
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(
            open_files_limit(unlimited),
            Some(Limit {
                soft: None,
                hard: None
            })
        );
        assert_eq!(open_files_limit("Max processes 1 1 processes\n"), None);
    }
}
