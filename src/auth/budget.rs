//! The per-client-address budget of uncached verifications: how many tokens the gateway has not
//! cached one address may present per second (each one is an OP call, or a JWT check) before it
//! is answered 429 `M_LIMIT_EXCEEDED` without any work. Tokens already cached never touch it, so
//! a flood of made-up tokens from one address costs its sender, not the users whose tokens the
//! gateway knows (issue #12's flood).
//!
//! A generic cell rate algorithm per address: each address has a "theoretical arrival time"
//! (TAT); a request is admitted when the TAT is at most `burst - 1` intervals ahead of now. An
//! address whose TAT is in the past has a full budget, so it needs no entry: the table only holds
//! addresses that spent budget within the last burst window, and is swept when it is full.
//!
//! Addresses: IPv4 as they are; IPv6 by their /64 (what one subscriber is given); IPv4-mapped
//! IPv6 as IPv4. Which address counts (the peer, or the last hop of `X-Forwarded-For` behind a
//! trusted proxy) is the caller's choice.

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;

/// Most addresses tracked at once. Past it (after a sweep), an address with no entry is
/// admitted untracked: the per-issuer introspection bound still holds for a flood from more
/// addresses than this.
const MAX_TRACKED: usize = 65_536;

/// The budget: `rate` uncached verifications per second per address, `burst` at once.
#[derive(Debug)]
pub struct AddressBudget {
    /// Microseconds between two admissions at the sustained rate.
    interval_us: u64,
    /// How far ahead of now a TAT may be and still admit: `(burst - 1) * interval`.
    tolerance_us: u64,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    tat: HashMap<AddressKey, u64>,
    /// When the table was last swept: at most one sweep a second, so a flood from ever new
    /// addresses cannot make every request walk a full table.
    swept_us: Option<u64>,
}

/// The part of an address that is budgeted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(u32),
    V6Prefix(u64),
}

impl AddressKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(u32::from(v4)),
                None => AddressKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl AddressBudget {
    /// A budget of `per_sec` a second with bursts of `burst`; `None` when `per_sec` is 0 (off).
    pub fn new(per_sec: u32, burst: u32) -> Option<Self> {
        if per_sec == 0 {
            return None;
        }
        let interval_us = (1_000_000 / u64::from(per_sec)).max(1);
        Some(Self {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst.max(1)) - 1),
            table: Mutex::new(Table::default()),
        })
    }

    /// Spends one unit of `ip`'s budget at `now_us` (microseconds, any monotonic-enough
    /// origin). `Err(ms)`: over budget, with how long until one unit is back.
    pub fn spend(&self, ip: IpAddr, now_us: u64) -> Result<(), u64> {
        let key = AddressKey::of(ip);
        let mut table = self.table.lock();
        let tat = table.tat.get(&key).copied().unwrap_or(0).max(now_us);
        let ahead = tat - now_us;
        if ahead > self.tolerance_us {
            let wait_us = ahead - self.tolerance_us;
            return Err(wait_us.div_ceil(1000).max(1));
        }
        if table.tat.len() >= MAX_TRACKED && !table.tat.contains_key(&key) {
            let due = table
                .swept_us
                .is_none_or(|last| now_us.saturating_sub(last) >= 1_000_000);
            if due {
                table.swept_us = Some(now_us);
                table.tat.retain(|_, t| *t > now_us);
            }
            if table.tat.len() >= MAX_TRACKED {
                return Ok(());
            }
        }
        table.tat.insert(key, tat.saturating_add(self.interval_us));
        Ok(())
    }

    /// Addresses holding an entry (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table.lock().tat.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_is_admitted_then_the_sustained_rate() {
        let b = AddressBudget::new(10, 3).unwrap();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(b.spend(a, 1_000_000), Ok(()));
        }
        // The fourth at the same instant waits one interval (100 ms).
        assert_eq!(b.spend(a, 1_000_000), Err(100));
        // 100 ms later one unit is back, and only one.
        assert_eq!(b.spend(a, 1_100_000), Ok(()));
        assert_eq!(b.spend(a, 1_100_000), Err(100));
    }

    #[test]
    fn addresses_have_their_own_budgets() {
        let b = AddressBudget::new(1, 1).unwrap();
        assert_eq!(b.spend(ip("192.0.2.1"), 0), Ok(()));
        assert!(b.spend(ip("192.0.2.1"), 0).is_err());
        assert_eq!(b.spend(ip("192.0.2.2"), 0), Ok(()));
    }

    #[test]
    fn ipv6_is_budgeted_by_its_64_and_mapped_ipv4_as_ipv4() {
        let b = AddressBudget::new(1, 1).unwrap();
        assert_eq!(b.spend(ip("2001:db8:1:2::1"), 0), Ok(()));
        assert!(b.spend(ip("2001:db8:1:2:ffff::9"), 0).is_err());
        assert_eq!(b.spend(ip("2001:db8:1:3::1"), 0), Ok(()));
        assert_eq!(b.spend(ip("198.51.100.7"), 0), Ok(()));
        assert!(b.spend(ip("::ffff:198.51.100.7"), 0).is_err());
    }

    #[test]
    fn zero_is_off_and_a_full_table_forgets_spent_out_addresses_first() {
        assert!(AddressBudget::new(0, 10).is_none());
        let b = AddressBudget::new(1_000_000, 1).unwrap();
        for i in 0..MAX_TRACKED as u32 {
            b.spend(IpAddr::V4(i.into()), 0).unwrap();
        }
        assert_eq!(b.tracked(), MAX_TRACKED);
        // 1 µs later every entry is back to a full budget: the sweep empties the table.
        b.spend(ip("203.0.113.1"), 1).unwrap();
        assert_eq!(b.tracked(), 1);
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        let b = AddressBudget::new(1, 1).unwrap();
        for i in 0..MAX_TRACKED as u32 {
            b.spend(IpAddr::V4(i.into()), 0).unwrap();
        }
        // Nothing has expired at 10 µs: the sweep finds nothing. At 1_000_005 µs every budget
        // is back, but the last sweep was under a second ago: no sweep, admitted untracked.
        b.spend(ip("203.0.113.1"), 10).unwrap();
        assert_eq!(b.tracked(), MAX_TRACKED);
        b.spend(ip("203.0.113.2"), 1_000_005).unwrap();
        assert_eq!(b.tracked(), MAX_TRACKED);
        // A second after the last sweep, it sweeps: every budget is back by then.
        b.spend(ip("203.0.113.3"), 1_000_011).unwrap();
        assert_eq!(b.tracked(), 1);
    }

    #[test]
    fn an_untracked_address_past_the_limit_is_admitted() {
        let b = AddressBudget::new(1, 1).unwrap();
        for i in 0..MAX_TRACKED as u32 {
            b.spend(IpAddr::V4(i.into()), 0).unwrap();
        }
        let late = ip("203.0.113.1");
        assert_eq!(b.spend(late, 0), Ok(()));
        assert_eq!(b.spend(late, 0), Ok(()));
        // A tracked one is still held to its budget.
        assert!(b.spend(IpAddr::V4(0u32.into()), 0).is_err());
    }
}
