//! What ping and pong put in their messages, so each side can check every byte it receives
//! against what it computes itself.
//!
//! Request `id` is [`request_len`]`(id)` bytes (1 to [`PAYLOAD_BYTES`], varying from message
//! to message), byte `i` being [`request_byte`]`(id, i)`, a hash of both, so a byte that lands
//! in the wrong message or the wrong place is caught. Pong answers with [`answer`]: the
//! request reversed and inverted, computed from the bytes it received; ping checks the
//! answer against [`response_byte`], computed from `id` alone.

use crate::ring::PAYLOAD_BYTES;

/// The length of request `id` (and of its answer).
pub fn request_len(id: u32) -> usize {
    1 + (id as usize).wrapping_mul(37) % PAYLOAD_BYTES
}

/// Byte `index` of request `id`. Never `0x00` or `0xff`, so no request and no answer holds a
/// zero byte: a page of zeros (what a dead peer's grant turns into) fails every check.
pub fn request_byte(id: u32, index: usize) -> u8 {
    let x = id.wrapping_add(1).wrapping_mul(0x9e37_79b9)
        ^ (index as u32).wrapping_add(1).wrapping_mul(0x85eb_ca6b);
    match (x ^ (x >> 13) ^ (x >> 24)) as u8 {
        0x00 => 0x5a,
        0xff => 0xa5,
        byte => byte,
    }
}

/// Byte `index` of the answer to request `id`.
pub fn response_byte(id: u32, index: usize) -> u8 {
    !request_byte(id, request_len(id) - 1 - index)
}

/// Writes request `id` into `buffer`; returns its length.
pub fn fill_request(id: u32, buffer: &mut [u8; PAYLOAD_BYTES]) -> usize {
    let len = request_len(id);
    for (index, byte) in buffer[..len].iter_mut().enumerate() {
        *byte = request_byte(id, index);
    }
    len
}

/// The answer to `request`: its bytes in reverse order, each inverted.
pub fn answer(request: &[u8], response: &mut [u8; PAYLOAD_BYTES]) -> usize {
    let len = request.len().min(PAYLOAD_BYTES);
    for (out, &byte) in response[..len].iter_mut().zip(request[..len].iter().rev()) {
        *out = !byte;
    }
    len
}

/// How many bytes of `received` differ from request `id` (a wrong length counts every
/// missing or extra byte).
pub fn request_mismatches(id: u32, received: &[u8]) -> usize {
    mismatches(received, request_len(id), |index| request_byte(id, index))
}

/// How many bytes of `received` differ from the answer to request `id`.
pub fn response_mismatches(id: u32, received: &[u8]) -> usize {
    mismatches(received, request_len(id), |index| response_byte(id, index))
}

fn mismatches(received: &[u8], expected_len: usize, expected: impl Fn(usize) -> u8) -> usize {
    let compared = received.len().min(expected_len);
    let wrong = received[..compared]
        .iter()
        .enumerate()
        .filter(|&(index, &byte)| byte != expected(index))
        .count();
    wrong + received.len().abs_diff(expected_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_cover_every_size() {
        let mut seen = [false; PAYLOAD_BYTES + 1];
        for id in 0..10_000 {
            seen[request_len(id)] = true;
        }
        assert!(!seen[0]);
        assert!(
            seen[1..].iter().all(|&s| s),
            "every length from 1 to the maximum"
        );
    }

    #[test]
    fn an_answer_checks_out_and_a_flipped_byte_does_not() {
        let mut request = [0; PAYLOAD_BYTES];
        let mut response = [0; PAYLOAD_BYTES];
        for id in [0, 1, 2, 499, 9_999, u32::MAX] {
            let len = fill_request(id, &mut request);
            assert_eq!(request_mismatches(id, &request[..len]), 0);
            assert_eq!(answer(&request[..len], &mut response), len);
            assert_eq!(response_mismatches(id, &response[..len]), 0);
            response[len / 2] ^= 0x10;
            assert_eq!(response_mismatches(id, &response[..len]), 1);
            // A request is not its own answer, nor another message's.
            assert!(response_mismatches(id, &request[..len]) > 0);
            assert!(request_mismatches(id.wrapping_add(1), &request[..len]) > 0);
            // Short or long by one byte.
            assert_eq!(request_mismatches(id, &request[..len - 1]), 1);
        }
    }

    #[test]
    fn no_message_holds_a_zero_byte() {
        for id in (0..20_000).chain([u32::MAX - 1, u32::MAX]) {
            let len = request_len(id);
            for index in 0..len {
                assert_ne!(request_byte(id, index), 0, "request {id} byte {index}");
                assert_ne!(response_byte(id, index), 0, "answer {id} byte {index}");
            }
            let zeros = [0u8; PAYLOAD_BYTES];
            assert_eq!(request_mismatches(id, &zeros[..len]), len);
        }
    }
}
