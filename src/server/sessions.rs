//! Kiosk sessions: a shopper's history and the saved KV state of its last prompt, kept for at
//! most `max` sessions (the least recently used is evicted) and for at most `idle` without use.

use illmrec::recommender::SessionState;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct Session {
    pub history: Vec<u64>,
    /// Taken out while a tap is being computed; `None` then (a concurrent tap on the same
    /// session decodes its prompt cold).
    pub state: Option<SessionState>,
    last_used: Instant,
}

pub struct Sessions {
    map: HashMap<String, Session>,
    max: usize,
    idle: Duration,
    /// Sessions dropped so far, by eviction or expiry.
    pub evicted: u64,
    pub expired: u64,
    /// Bumped when the catalog changes: a state taken out before is not put back.
    pub generation: u64,
}

impl Sessions {
    pub fn new(max: usize, idle: Duration) -> Self {
        Self {
            map: HashMap::new(),
            max: max.max(1),
            idle,
            evicted: 0,
            expired: 0,
            generation: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes of KV state held.
    pub fn bytes(&self) -> usize {
        self.map
            .values()
            .map(|s| s.state.as_ref().map_or(0, SessionState::size))
            .sum()
    }

    /// Drops the sessions idle for longer than the limit.
    pub fn expire(&mut self, now: Instant) {
        let idle = self.idle;
        let before = self.map.len();
        self.map
            .retain(|_, s| now.saturating_duration_since(s.last_used) <= idle);
        self.expired += (before - self.map.len()) as u64;
    }

    /// Adds a session, evicting the least recently used ones to stay within the bound.
    pub fn insert(&mut self, id: String, history: Vec<u64>, now: Instant) {
        self.expire(now);
        while self.map.len() >= self.max {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
                .expect("non-empty");
            self.map.remove(&oldest);
            self.evicted += 1;
        }
        self.map.insert(
            id,
            Session {
                history,
                state: Some(SessionState::default()),
                last_used: now,
            },
        );
    }

    /// The session, marked as used now (`None`: unknown, evicted or expired).
    pub fn get(&mut self, id: &str, now: Instant) -> Option<&mut Session> {
        self.expire(now);
        let s = self.map.get_mut(id)?;
        s.last_used = now;
        Some(s)
    }

    /// After a catalog change: saved states are dropped (an item's prompt may differ now),
    /// and a removed item leaves every history.
    pub fn catalog_changed(&mut self, removed: Option<u64>) {
        self.generation += 1;
        for s in self.map.values_mut() {
            s.state = Some(SessionState::default());
            if let Some(id) = removed {
                s.history.retain(|&x| x != id);
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> bool {
        self.map.remove(id).is_some()
    }
}

/// A new session id: 128 random bits from the OS, in hex.
pub fn new_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        use std::hash::{BuildHasher, Hasher};
        for half in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(Instant::now().elapsed().as_nanos());
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_is_evicted_and_idle_ones_expire() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut sessions = Sessions::new(2, Duration::from_secs(100));
        sessions.insert("a".into(), vec![1], s(0));
        sessions.insert("b".into(), vec![2], s(1));
        assert!(sessions.get("a", s(2)).is_some()); // a is now the most recent
        sessions.insert("c".into(), vec![3], s(3));
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions.evicted, 1);
        assert!(sessions.get("b", s(4)).is_none());
        assert!(sessions.get("a", s(5)).is_some());
        assert!(sessions.get("c", s(50)).is_some());
        assert!(sessions.get("a", s(106)).is_none()); // idle since 5
        assert_eq!(sessions.expired, 1);
        assert!(sessions.get("c", s(140)).is_some());
        assert!(sessions.remove("c"));
        assert_eq!(sessions.len(), 0);
    }

    #[test]
    fn ids_are_random_hex() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
