//! Deterministic test data: the byte at offset `o` depends only on `o`, so a
//! sender can produce any stretch of a large payload without storing it.

/// Fills `buffer` with the payload bytes starting at `offset`.
pub fn fill(buffer: &mut [u8], offset: u64) {
    for (i, byte) in buffer.iter_mut().enumerate() {
        let position = offset + i as u64;
        *byte = (word(position / 8) >> ((position % 8) * 8)) as u8;
    }
}

/// splitmix64 of the word index.
fn word(index: u64) -> u64 {
    let mut z = index.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    #[test]
    fn any_split_gives_the_same_bytes() {
        let mut whole = vec![0; 100];
        super::fill(&mut whole, 5);
        let mut parts = vec![0; 100];
        super::fill(&mut parts[..33], 5);
        super::fill(&mut parts[33..], 38);
        assert_eq!(whole, parts);
        assert_ne!(whole[..8], whole[8..16]);
    }
}
