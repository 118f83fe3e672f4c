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
//! trusted proxy) is the caller's choice. Time is monotonic (a wall-clock step back must not
//! lock addresses out).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use std::time::Instant;

use parking_lot::Mutex;

/// Most addresses tracked at once. Past it (after a sweep), addresses with no entry share one
/// overflow budget, so filling the table (one IPv6 /48 holds 65,536 /64s) buys no one an
/// unlimited budget.
const MAX_TRACKED: usize = 65_536;

/// A keyed budget (a generic cell rate algorithm per key): one unit every `interval`, `burst`
/// at once. The address budget below and the password-attempt budgets of the compat layer are
/// instances.
#[derive(Debug)]
pub struct Budget<K> {
    /// Microseconds between two admissions at the sustained rate.
    interval_us: u64,
    /// How far ahead of now a TAT may be and still admit: `(burst - 1) * interval`.
    tolerance_us: u64,
    table: Mutex<Table<K>>,
    /// The origin of the monotonic microseconds [`Budget::spend_now`] uses.
    origin: Instant,
}

#[derive(Debug)]
struct Table<K> {
    tat: HashMap<K, u64>,
    /// The TAT shared by keys that found the table full.
    overflow: u64,
    /// When the table was last swept: at most one sweep a second, so a flood of ever new
    /// keys cannot make every request walk a full table.
    swept_us: Option<u64>,
}

impl<K: Hash + Eq + Copy> Budget<K> {
    /// One unit every `interval_us` microseconds, `burst` at once.
    pub fn new(interval_us: u64, burst: u32) -> Self {
        let interval_us = interval_us.max(1);
        Self {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst.max(1)) - 1),
            table: Mutex::new(Table {
                tat: HashMap::new(),
                overflow: 0,
                swept_us: None,
            }),
            origin: Instant::now(),
        }
    }

    /// A budget of `per_minute` units a minute, all of them at once.
    pub fn per_minute(per_minute: u32) -> Self {
        Self::new(60_000_000 / u64::from(per_minute.max(1)), per_minute)
    }

    /// Spends one unit of `key`'s budget now. `Err(ms)`: over budget, with how long until the
    /// key may try again.
    pub fn spend_now(&self, key: K) -> Result<(), u64> {
        self.spend(key, self.now_us())
    }

    /// Gives back the unit [`Budget::spend_now`] took, when the work it paid for did not
    /// happen (the OP failed or shed the call: that answer is a 503, and must stay one).
    pub fn refund_now(&self, key: K) {
        let mut table = self.table.lock();
        let slot = match table.tat.get_mut(&key) {
            Some(t) => t,
            None => &mut table.overflow,
        };
        // A TAT in the past means a full budget, so going below now is harmless.
        *slot = slot.saturating_sub(self.interval_us);
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Spends one unit of `key`'s budget at `now_us` (monotonic microseconds). `Err(ms)`: over
    /// budget, with how long until the key may try again (at least a second: a client told
    /// "1 ms" would only come back at once, with everyone behind the same key).
    fn spend(&self, key: K, now_us: u64) -> Result<(), u64> {
        let mut table = self.table.lock();
        let table = &mut *table;
        if table.tat.len() >= MAX_TRACKED && !table.tat.contains_key(&key) {
            let due = table
                .swept_us
                .is_none_or(|last| now_us.saturating_sub(last) >= 1_000_000);
            if due {
                table.swept_us = Some(now_us);
                table.tat.retain(|_, t| *t > now_us);
            }
        }
        let slot = if table.tat.len() < MAX_TRACKED || table.tat.contains_key(&key) {
            table.tat.entry(key).or_insert(0)
        } else {
            &mut table.overflow
        };
        let tat = (*slot).max(now_us);
        let ahead = tat - now_us;
        if ahead > self.tolerance_us {
            let wait_us = ahead - self.tolerance_us;
            return Err(wait_us.div_ceil(1000).max(1000));
        }
        *slot = tat.saturating_add(self.interval_us);
        Ok(())
    }

    /// Keys holding an entry (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table.lock().tat.len()
    }
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

/// The budget: `rate` uncached verifications per second per address, `burst` at once.
#[derive(Debug)]
pub struct AddressBudget(Budget<AddressKey>);

impl AddressBudget {
    /// A budget of `per_sec` a second with bursts of `burst`; `None` when `per_sec` is 0 (off).
    pub fn new(per_sec: u32, burst: u32) -> Option<Self> {
        if per_sec == 0 {
            return None;
        }
        Some(Self(Budget::new(1_000_000 / u64::from(per_sec), burst)))
    }

    /// A budget of `per_minute` a minute, all of them at once.
    pub fn per_minute(per_minute: u32) -> Self {
        Self(Budget::per_minute(per_minute))
    }

    /// Spends one unit of `ip`'s budget now. `Err(ms)`: over budget, with how long until the
    /// address may try again.
    pub fn spend_now(&self, ip: IpAddr) -> Result<(), u64> {
        self.0.spend_now(AddressKey::of(ip))
    }

    /// Gives back the unit [`AddressBudget::spend_now`] took.
    pub fn refund_now(&self, ip: IpAddr) {
        self.0.refund_now(AddressKey::of(ip));
    }

    #[cfg(test)]
    fn spend(&self, ip: IpAddr, now_us: u64) -> Result<(), u64> {
        self.0.spend(AddressKey::of(ip), now_us)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.0.tracked()
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
        // The fourth at the same instant is refused (one interval, 100 ms, to wait; clients
        // are told at least a second).
        assert_eq!(b.spend(a, 1_000_000), Err(1000));
        // 100 ms later one unit is back, and only one.
        assert_eq!(b.spend(a, 1_100_000), Ok(()));
        assert!(b.spend(a, 1_100_000).is_err());
    }

    #[test]
    fn the_wait_announced_is_how_long_until_a_unit_is_back() {
        let b = AddressBudget::new(1, 1).unwrap();
        let a = ip("192.0.2.1");
        b.spend(a, 0).unwrap();
        assert_eq!(b.spend(a, 0), Err(1000));
        let b = AddressBudget::new(1, 1).unwrap();
        b.spend(a, 0).unwrap();
        b.spend(a, 1_000_000).unwrap();
        // Spending ahead does not push the TAT further: refused answers cost nothing.
        for _ in 0..10 {
            assert_eq!(b.spend(a, 1_000_000), Err(1000));
        }
        assert_eq!(b.spend(a, 2_000_000), Ok(()));
    }

    #[test]
    fn a_refund_gives_the_unit_back() {
        let b = AddressBudget::new(1, 1).unwrap();
        let a = ip("192.0.2.1");
        b.spend_now(a).unwrap();
        assert!(b.spend_now(a).is_err());
        b.refund_now(a);
        assert_eq!(b.spend_now(a), Ok(()));
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

    fn fill(b: &AddressBudget, at_us: u64) {
        for i in 0..MAX_TRACKED as u32 {
            b.spend(IpAddr::V4(i.into()), at_us).unwrap();
        }
        assert_eq!(b.tracked(), MAX_TRACKED);
    }

    #[test]
    fn zero_is_off_and_a_full_table_forgets_spent_out_addresses_first() {
        assert!(AddressBudget::new(0, 10).is_none());
        let b = AddressBudget::new(1_000_000, 1).unwrap();
        fill(&b, 0);
        // 1 µs later every entry is back to a full budget: the sweep empties the table.
        b.spend(ip("203.0.113.1"), 1).unwrap();
        assert_eq!(b.tracked(), 1);
    }

    #[test]
    fn addresses_past_a_full_table_share_one_overflow_budget() {
        let b = AddressBudget::new(1, 2).unwrap();
        fill(&b, 0);
        // Two new addresses use the overflow's burst of two; the third is refused, as is a
        // fourth: filling the table bought nobody an unlimited budget.
        b.spend(ip("203.0.113.1"), 0).unwrap();
        b.spend(ip("2001:db8::1"), 0).unwrap();
        assert!(b.spend(ip("203.0.113.2"), 0).is_err());
        assert!(b.spend(ip("203.0.113.1"), 0).is_err());
        assert_eq!(b.tracked(), MAX_TRACKED);
        // A tracked one keeps its own budget.
        assert_eq!(b.spend(IpAddr::V4(0u32.into()), 0), Ok(()));
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        let b = AddressBudget::new(1, 100).unwrap();
        fill(&b, 0);
        // Entries at 0 with a 1 s interval are spent out until 1 s. At 10 µs the sweep finds
        // nothing; at 1_000_005 µs every budget is back, but the last sweep was under a second
        // ago: no sweep (the new address goes to the overflow budget).
        b.spend(ip("203.0.113.1"), 10).unwrap();
        assert_eq!(b.tracked(), MAX_TRACKED);
        b.spend(ip("203.0.113.2"), 1_000_005).unwrap();
        assert_eq!(b.tracked(), MAX_TRACKED);
        // A second after the last sweep, it sweeps.
        b.spend(ip("203.0.113.3"), 1_000_011).unwrap();
        assert_eq!(b.tracked(), 1);
    }
}
