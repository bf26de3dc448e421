//! Pod IPs: each pod gets its own loopback address, 127.0.0.10 upwards, so
//! several pods can listen on the same port as they would in a cluster. The
//! pool is one per process (several kubelets may run in one test binary) and
//! hands addresses out round-robin, so a freed address is not reused at once
//! (a client may still hold the old pod's address).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{LazyLock, Mutex, MutexGuard};

/// The first and last addresses handed out; all inside 127.0.0.0/8.
const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const LAST: Ipv4Addr = Ipv4Addr::new(127, 0, 255, 254);

#[derive(Debug)]
pub(crate) struct IpPool {
    next: u32,
    in_use: HashSet<Ipv4Addr>,
}

impl IpPool {
    pub(crate) fn new() -> IpPool {
        IpPool {
            next: FIRST.to_bits(),
            in_use: HashSet::new(),
        }
    }

    /// The next free address, or None when every address is in use.
    pub(crate) fn allocate(&mut self) -> Option<Ipv4Addr> {
        let size = LAST.to_bits() - FIRST.to_bits() + 1;
        for _ in 0..size {
            let candidate = Ipv4Addr::from_bits(self.next);
            self.next = if self.next >= LAST.to_bits() {
                FIRST.to_bits()
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
}
