//! Pod IPs: each pod gets its own loopback address, 127.0.0.10 upwards, so
//! several pods can listen on the same port as they would in a cluster. The
//! pool is one per process (several kubelets may run in one test binary) and
//! hands addresses out round-robin, so a freed address is not reused at once
//! (a client may still hold the old pod's address). A program that shares the
//! machine with the tests (the playground) picks another range with
//! [`set_pod_ip_range`] before its kubelet starts.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex, MutexGuard};

use anyhow::{Result, bail};

/// The first and last addresses handed out by default; all inside 127.0.0.0/8.
const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const LAST: Ipv4Addr = Ipv4Addr::new(127, 0, 255, 254);

/// An inclusive range of loopback addresses for pods, written `FIRST-LAST`
/// (e.g. `127.0.100.10-127.0.100.254`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodIpRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl PodIpRange {
    /// A range inside 127.0.0.0/8 with `first <= last`, or why not.
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Result<PodIpRange> {
        if !first.is_loopback() || !last.is_loopback() {
            bail!("pod addresses must be loopback (127.0.0.0/8), not {first}-{last}");
        }
        if first > last {
            bail!("pod address range {first}-{last} is empty (the first is after the last)");
        }
        Ok(PodIpRange { first, last })
    }
}

impl Default for PodIpRange {
    fn default() -> Self {
        PodIpRange {
            first: FIRST,
            last: LAST,
        }
    }
}

impl std::fmt::Display for PodIpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PodIpRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<PodIpRange> {
        let Some((first, last)) = s.split_once('-') else {
            bail!("expected FIRST-LAST, e.g. 127.0.100.10-127.0.100.254, not {s:?}");
        };
        let parse = |a: &str| {
            a.trim()
                .parse::<Ipv4Addr>()
                .map_err(|e| anyhow::anyhow!("{a:?} is not an IPv4 address: {e}"))
        };
        PodIpRange::new(parse(first)?, parse(last)?)
    }
}

#[derive(Debug)]
pub(crate) struct IpPool {
    range: PodIpRange,
    next: u32,
    in_use: HashSet<Ipv4Addr>,
}

impl IpPool {
    pub(crate) fn new() -> IpPool {
        Self::with_range(PodIpRange::default())
    }

    fn with_range(range: PodIpRange) -> IpPool {
        IpPool {
            range,
            next: range.first.to_bits(),
            in_use: HashSet::new(),
        }
    }

    /// The next free address, or None when every address is in use.
    pub(crate) fn allocate(&mut self) -> Option<Ipv4Addr> {
        let (first, last) = (self.range.first.to_bits(), self.range.last.to_bits());
        let size = last - first + 1;
        for _ in 0..size {
            let candidate = Ipv4Addr::from_bits(self.next);
            self.next = if self.next >= last {
                first
            } else {
                self.next + 1
            };
            let last_octet = candidate.octets()[3];
            // .0 and .255 look like network and broadcast addresses to people
            // reading logs; skip them.
            if last_octet == 0 || last_octet == 255 || self.in_use.contains(&candidate) {
                continue;
            }
            debug_assert!(candidate.is_loopback());
            self.in_use.insert(candidate);
            return Some(candidate);
        }
        None
    }

    pub(crate) fn release(&mut self, ip: Ipv4Addr) {
        self.in_use.remove(&ip);
    }
}

fn pool() -> MutexGuard<'static, IpPool> {
    static POOL: LazyLock<Mutex<IpPool>> = LazyLock::new(|| Mutex::new(IpPool::new()));
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes every kubelet of this process hand out pod addresses from `range`.
/// Fails while a pod holds an address (set it before starting a kubelet).
pub fn set_pod_ip_range(range: PodIpRange) -> Result<()> {
    let mut pool = pool();
    if !pool.in_use.is_empty() {
        bail!(
            "the pod address range cannot change while {} pods hold addresses",
            pool.in_use.len()
        );
    }
    *pool = IpPool::with_range(range);
    Ok(())
}

/// An address taken from the process-wide pool, given back on drop.
#[derive(Debug)]
pub(crate) struct IpLease(Ipv4Addr);

impl IpLease {
    pub(crate) fn take() -> Option<IpLease> {
        pool().allocate().map(IpLease)
    }

    pub(crate) fn ip(&self) -> Ipv4Addr {
        self.0
    }
}

impl Drop for IpLease {
    fn drop(&mut self) {
        pool().release(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_loopback_unique_and_not_reused_at_once() {
        let mut pool = IpPool::new();
        let a = pool.allocate().expect("an address");
        let b = pool.allocate().expect("an address");
        assert_eq!(a, Ipv4Addr::new(127, 0, 0, 10));
        assert_eq!(b, Ipv4Addr::new(127, 0, 0, 11));
        pool.release(a);
        let c = pool.allocate().expect("an address");
        assert_eq!(
            c,
            Ipv4Addr::new(127, 0, 0, 12),
            "a freed address is not reused at once"
        );
    }

    #[test]
    fn the_pool_wraps_around_skipping_addresses_in_use() {
        let mut pool = IpPool::new();
        let first = pool.allocate().expect("an address");
        pool.next = LAST.to_bits();
        assert_eq!(pool.allocate(), Some(LAST));
        // Wraps to the start, where 127.0.0.10 is still in use.
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 0, 11)));
        assert!(pool.in_use.contains(&first));
        for ip in &pool.in_use {
            assert!(ip.is_loopback());
        }
    }

    #[test]
    fn a_custom_range_is_handed_out_and_wraps_within_itself() {
        let range: PodIpRange = "127.0.100.253-127.0.101.1".parse().expect("a range");
        let mut pool = IpPool::with_range(range);
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 100, 253)));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 100, 254)));
        // .255 and .0 are skipped.
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 101, 1)));
        assert_eq!(
            pool.allocate(),
            None,
            "every address of the range is in use"
        );
        pool.release(Ipv4Addr::new(127, 0, 100, 254));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 100, 254)));
    }

    #[test]
    fn ranges_outside_loopback_or_backwards_are_refused() {
        for bad in [
            "10.0.0.1-10.0.0.9",
            "127.0.0.9-127.0.0.1",
            "127.0.0.1",
            "127.0.0.1-x",
        ] {
            assert!(
                bad.parse::<PodIpRange>().is_err(),
                "{bad} should be refused"
            );
        }
        let range: PodIpRange = "127.0.100.10-127.0.100.20".parse().expect("a range");
        assert_eq!(range.to_string(), "127.0.100.10-127.0.100.20");
    }
}
