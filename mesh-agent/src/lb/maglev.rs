//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! where each endpoint owns slots in proportion to its weight, filled so
//! that adding or removing one endpoint moves about 1/N of the keys.

/// Prime table sizes. A table takes the smallest that is at least 100
/// times its (virtual) endpoints, as the paper advises for even spread:
/// a service of three pods holds 1,021 slots (4 KB), not 65,537 (256 KB),
/// so a thousand consistent-hash services fit in a few MB. Crossing a size
/// reshuffles that service's keys once; within one size, adding or
/// removing an endpoint moves about its share.
const TABLE_SIZES: [usize; 7] = [1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_537];

/// Most virtual endpoints (weight replicas) in one table: weights whose
/// ratios would need more are scaled down to it, so a weight of a million
/// next to a weight of one cannot make a table of millions of entries.
const MAX_VIRTUALS: u64 = 655;

pub struct Maglev {
    /// Slot -> index into the endpoint list the table was built from.
    table: Vec<u32>,
}

/// The table size for `virtuals` virtual endpoints.
fn table_size(virtuals: usize) -> usize {
    TABLE_SIZES
        .into_iter()
        .find(|&size| size >= 100 * virtuals)
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
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
        // Weighted Maglev by replication: weight w gives w/gcd virtual
        // entries, scaled down (each keeping at least one) past the cap.
        let total: u64 = endpoints.iter().map(|(_, w)| u64::from(w / divisor)).sum();
        let replicas = |weight: u32| -> u64 {
            let replicas = u64::from(weight / divisor);
            if weight == 0 || total <= MAX_VIRTUALS {
                replicas
            } else {
                (replicas * MAX_VIRTUALS / total).max(1)
            }
        };
        let count: u64 = endpoints.iter().map(|(_, w)| replicas(*w)).sum();
        let size = table_size(count as usize);
        let mut virtuals: Vec<(u32, u64, u64)> = Vec::with_capacity(count as usize);
        for (index, (name, weight)) in endpoints.iter().enumerate() {
            for replica in 0..replicas(*weight) {
                let key = format!("{name}#{replica}");
                let offset = fnv1a(key.as_bytes(), 0) % size as u64;
                let skip = fnv1a(key.as_bytes(), 1) % (size as u64 - 1) + 1;
                virtuals.push((index as u32, offset, skip));
            }
        }
        let mut table = vec![u32::MAX; size];
        let mut next = vec![0u64; virtuals.len()];
        let mut filled = 0;
        'fill: loop {
            for (v, (index, offset, skip)) in virtuals.iter().enumerate() {
                let mut slot = ((offset + next[v] * skip) % size as u64) as usize;
                while table[slot] != u32::MAX {
                    next[v] += 1;
                    slot = ((offset + next[v] * skip) % size as u64) as usize;
                }
                table[slot] = *index;
                next[v] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Some(Self { table })
    }

    /// The endpoint for `key`, and the ones after it in a fixed probe order
    /// (for when the first is unavailable).
    pub fn lookup(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        let size = self.table.len();
        let hash = fnv1a(key, 2);
        let start = (hash % size as u64) as usize;
        let step = (fnv1a(key, 3) % (size as u64 - 1) + 1) as usize;
        (0..64).map(move |k| self.table[(start + k * step) % size] as usize)
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
        let quarter = table.table.len() / 4;
        assert!(counts[0].abs_diff(quarter) < quarter / 10, "{counts:?}");
        assert!(counts[2].abs_diff(2 * quarter) < quarter / 10, "{counts:?}");
    }

    #[test]
    fn tables_are_sized_to_their_endpoints_and_weights_are_capped() {
        let small = Maglev::new([("a", 1), ("b", 1), ("c", 1)]).unwrap();
        assert_eq!(small.table.len(), 1_021);
        // A weight of a million beside a weight of one: the ratio is kept
        // as far as the cap allows, and the table stays bounded.
        let skewed = Maglev::new([("a", 1_000_000), ("b", 1)]).unwrap();
        assert_eq!(skewed.table.len(), 65_537);
        let owned_by_b = skewed.table.iter().filter(|&&i| i == 1).count();
        assert!((1..=200).contains(&owned_by_b), "{owned_by_b}");
        let many: Vec<String> = (0..2_000).map(|i| format!("e{i}")).collect();
        let large = Maglev::new(many.iter().map(|n| (n.as_str(), 1))).unwrap();
        assert_eq!(large.table.len(), 65_537);
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
