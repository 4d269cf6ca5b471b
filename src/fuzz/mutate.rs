//! Format-blind mutation: the per-input random numbers ([`Rng`]), byte-level edits
//! ([`mutate_bytes`]) and edits of JSON trees ([`mutate_json`]).

use serde_json::{json, Value};

/// SplitMix64, seeded per input.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 26] = [
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

pub(super) fn interesting(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.next_u64(),
        _ => INTERESTING[rng.below(INTERESTING.len())],
    }
}

/// Overwrites `width` bytes at `at` (little-endian), clipped to the data.
pub(super) fn put_int(data: &mut [u8], at: usize, width: usize, value: u64) {
    for (k, b) in value.to_le_bytes()[..width].iter().enumerate() {
        if let Some(d) = data.get_mut(at + k) {
            *d = *b;
        }
    }
}

/// 1–4 byte-level edits.
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, pool: &[Vec<u8>]) {
    const TOKENS: [&[u8]; 14] = [
        b"\"", b"\\", b"{", b"}", b"[", b"]", b"\n", b"\xff", b"-", b"1e999", b"NaN", b",", b":",
        b"\\u0000",
    ];
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = [0u8, 1, 0x7f, 0x80, 0xff, rng.next_u64() as u8][rng.below(6)];
            }
            2 if len > 0 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = rng.below(len);
                let value = interesting(rng);
                put_int(data, at, width, value);
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                data.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let chunk = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, chunk);
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            7 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            8 => {
                let at = rng.below(len + 1);
                data.splice(at..at, TOKENS[rng.below(TOKENS.len())].iter().copied());
            }
            _ if len > 0 => {
                // A run of one byte (long lengths, deep nesting).
                let at = rng.below(len + 1);
                let b = data.get(rng.below(len)).copied().unwrap_or(b'[');
                let n = [16, 200, 5000][rng.below(3)];
                data.splice(at..at, std::iter::repeat_n(b, n));
            }
            _ => data.push(rng.next_u64() as u8),
        }
    }
}

fn interesting_json(rng: &mut Rng) -> Value {
    match rng.below(22) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1),
        5 => json!(u64::MAX),
        6 => json!(i64::MIN),
        7 => json!(1e300),
        8 => json!(-1e300),
        9 => json!(1e-300),
        10 => json!(0.5),
        11 => json!(""),
        12 => json!("x".repeat(1 << rng.below(14))),
        13 => json!("../../etc/passwd"),
        14 => json!("/dev/zero"),
        15 => json!([]),
        16 => json!({}),
        17 => json!("\u{0}\u{ffff}é"),
        18 => json!(65537),
        19 => json!(rng.next_u64()),
        20 => json!([1, 2, 3]),
        _ => json!((rng.next_u64() % 100_000) as f64 / 7.0),
    }
}

/// Edits one random node of a JSON tree.
pub fn mutate_json(rng: &mut Rng, v: &mut Value) {
    let descend = rng.below(3) != 0;
    match v {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
            mutate_json(rng, map.get_mut(&key).unwrap());
        }
        Value::Array(a) if descend && !a.is_empty() => {
            let i = rng.below(a.len());
            mutate_json(rng, &mut a[i]);
        }
        Value::Object(map) if !map.is_empty() && rng.below(2) == 0 => {
            let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
            match rng.below(3) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(format!("unknown{}", rng.below(3)), interesting_json(rng));
                }
                _ => {
                    map.insert(key, interesting_json(rng));
                }
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(2) == 0 => match rng.below(3) {
            0 => {
                a.remove(rng.below(a.len()));
            }
            1 => {
                let x = a[rng.below(a.len())].clone();
                a.push(x);
            }
            _ => a.push(interesting_json(rng)),
        },
        Value::Number(n) if rng.below(2) == 0 => {
            let x = n.as_f64().unwrap_or(0.0);
            *v = match rng.below(4) {
                0 => json!(x + 1.0),
                1 => json!(-x),
                2 => json!((x as i64).wrapping_mul(1 << 20)),
                _ => json!(x * 1e10),
            };
        }
        _ => *v = interesting_json(rng),
    }
}

pub(super) fn mutate_json_bytes(rng: &mut Rng, data: &mut Vec<u8>) {
    if let Ok(mut v) = serde_json::from_slice::<Value>(data) {
        for _ in 0..1 + rng.below(3) {
            mutate_json(rng, &mut v);
        }
        *data = serde_json::to_vec(&v).unwrap();
    }
}

pub(super) fn mutate_json_lines(rng: &mut Rng, data: &mut Vec<u8>) {
    let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(|l| l.to_vec()).collect();
    let i = rng.below(lines.len());
    match rng.below(4) {
        0 => {
            let x = lines[rng.below(lines.len())].clone();
            lines.insert(i, x);
        }
        1 if lines.len() > 1 => {
            lines.remove(i);
        }
        _ => mutate_json_bytes(rng, &mut lines[i]),
    }
    *data = lines.join(&b'\n');
}

// ---------------------------------------------------------------- seeds and format mutators
