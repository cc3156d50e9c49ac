//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! where each endpoint owns slots in proportion to its weight, filled so
//! that adding or removing one endpoint moves about 1/N of the keys.

/// Prime table size, well above 100× any realistic endpoint count.
pub const TABLE_SIZE: usize = 65_537;

pub struct Maglev {
    /// Slot -> index into the endpoint list the table was built from.
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table for endpoints given as `(name, weight)`; weight 0
    /// owns no slot. `None` when no endpoint has a weight.
    pub fn new<'a>(endpoints: impl IntoIterator<Item = (&'a str, u32)>) -> Option<Self> {
        let endpoints: Vec<(&str, u32)> = endpoints.into_iter().collect();
        let divisor = endpoints
            .iter()
            .map(|(_, w)| *w)
            .filter(|w| *w > 0)
            .fold(0, gcd);
        if divisor == 0 {
            return None;
        }
        // Weighted Maglev by replication: weight w gives w/gcd virtual entries.
        let mut virtuals: Vec<(u32, u64, u64)> = Vec::new();
        for (index, (name, weight)) in endpoints.iter().enumerate() {
            for replica in 0..weight / divisor {
                let key = format!("{name}#{replica}");
                let offset = fnv1a(key.as_bytes(), 0) % TABLE_SIZE as u64;
                let skip = fnv1a(key.as_bytes(), 1) % (TABLE_SIZE as u64 - 1) + 1;
                virtuals.push((index as u32, offset, skip));
            }
        }
        let mut table = vec![u32::MAX; TABLE_SIZE];
        let mut next = vec![0u64; virtuals.len()];
        let mut filled = 0;
        'fill: loop {
            for (v, (index, offset, skip)) in virtuals.iter().enumerate() {
                let mut slot = ((offset + next[v] * skip) % TABLE_SIZE as u64) as usize;
                while table[slot] != u32::MAX {
                    next[v] += 1;
                    slot = ((offset + next[v] * skip) % TABLE_SIZE as u64) as usize;
                }
                table[slot] = *index;
                next[v] += 1;
                filled += 1;
                if filled == TABLE_SIZE {
                    break 'fill;
                }
            }
        }
        Some(Self { table })
    }

    /// The endpoint for `key`, and the ones after it in a fixed probe order
    /// (for when the first is unavailable).
    pub fn lookup(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        let hash = fnv1a(key, 2);
        let start = (hash % TABLE_SIZE as u64) as usize;
        let step = (fnv1a(key, 3) % (TABLE_SIZE as u64 - 1) + 1) as usize;
        (0..64).map(move |k| self.table[(start + k * step) % TABLE_SIZE] as usize)
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// FNV-1a, seeded: fixed across builds and nodes, so every agent maps a
/// client to the same endpoint.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche: FNV alone clusters similar keys.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(table: &Maglev, client: u32) -> usize {
        table.lookup(&client.to_be_bytes()).next().unwrap()
    }

    #[test]
    fn spreads_evenly_and_by_weight() {
        let table = Maglev::new([("a", 1), ("b", 1), ("c", 2)]).unwrap();
        let mut counts = [0usize; 3];
        table.table.iter().for_each(|&i| counts[i as usize] += 1);
        let quarter = TABLE_SIZE / 4;
        assert!(counts[0].abs_diff(quarter) < quarter / 10, "{counts:?}");
        assert!(counts[2].abs_diff(2 * quarter) < quarter / 10, "{counts:?}");
    }

    #[test]
    fn adding_an_endpoint_moves_about_its_share() {
        let three = Maglev::new([("a", 1), ("b", 1), ("c", 1)]).unwrap();
        let four = Maglev::new([("a", 1), ("b", 1), ("c", 1), ("d", 1)]).unwrap();
        let moved = (0..10_000)
            .filter(|c| owner(&three, *c) != owner(&four, *c))
            .count();
        // Ideal: a quarter move (to d); Maglev stays close to that.
        assert!(moved < 3_300, "{moved} of 10000 moved");
    }
}
