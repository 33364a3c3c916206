//! What the `stress` domains put in the pages they grant each other, so each side can check
//! every byte it receives against what it computes itself.
//!
//! A lane's payload page has two halves. The client writes the request into the first
//! ([`REQUEST_OFFSET`]), the server the response into the second ([`RESPONSE_OFFSET`]). Each
//! half starts with a [`Header`]: the message's sequence number, lane, source domain, length
//! and an FNV-1a checksum of the header fields and the data; the data follows at
//! [`HEADER_BYTES`]. Request `seq` of lane `lane` from domain `source` is [`request_len`] bytes
//! (1 to [`DATA_MAX`]), byte `i` being [`request_byte`], a hash of all four, so a byte that
//! lands in the wrong message, lane, domain or place is caught even where a checksum would
//! collide. The response is the request reversed and inverted.

/// Bytes of a payload page.
pub const PAGE_BYTES: usize = 4096;
/// Bytes of one half of it: a message with its header.
pub const HALF_BYTES: usize = PAGE_BYTES / 2;
/// Where the request starts.
pub const REQUEST_OFFSET: usize = 0;
/// Where the response starts.
pub const RESPONSE_OFFSET: usize = HALF_BYTES;
/// The header before a message's data.
pub const HEADER_BYTES: usize = 32;
/// The longest message.
pub const DATA_MAX: usize = HALF_BYTES - HEADER_BYTES;

/// One half of a payload page.
pub type Half = [u8; HALF_BYTES];

/// Which message: who sent it on which lane, and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageId {
    /// The client's domain.
    pub source: u32,
    /// The lane (the client's vCPU).
    pub lane: u32,
    /// The sequence number, from 1.
    pub seq: u32,
}

/// A message's header, as it lies at the start of its half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Which message.
    pub id: MessageId,
    /// Data bytes after the header.
    pub len: u32,
    /// [`checksum`] of the other header fields and the data.
    pub checksum: u32,
}

impl Header {
    fn write(&self, half: &mut Half) {
        let fields = [
            self.id.seq,
            self.id.lane,
            self.id.source,
            self.len,
            self.checksum,
        ];
        for (at, value) in fields.iter().enumerate() {
            half[at * 4..at * 4 + 4].copy_from_slice(&value.to_le_bytes());
        }
    }

    /// The header at the start of `half`, as it reads.
    pub fn read(half: &Half) -> Header {
        let field = |at: usize| {
            let mut bytes = [0; 4];
            bytes.copy_from_slice(&half[at * 4..at * 4 + 4]);
            u32::from_le_bytes(bytes)
        };
        Header {
            id: MessageId {
                seq: field(0),
                lane: field(1),
                source: field(2),
            },
            len: field(3),
            checksum: field(4),
        }
    }
}

/// FNV-1a over the header fields but the checksum, then `data`.
pub fn checksum(id: MessageId, len: u32, data: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let fields = [id.seq, id.lane, id.source, len];
    for byte in fields
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .chain(data.iter().copied())
    {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

fn mix(id: MessageId) -> u32 {
    id.seq.wrapping_mul(0x9e37_79b9)
        ^ id.lane.wrapping_add(1).wrapping_mul(0x85eb_ca6b)
        ^ id.source.wrapping_add(1).wrapping_mul(0xc2b2_ae35)
}

/// The length of request `id` (and of its response).
pub fn request_len(id: MessageId) -> usize {
    1 + (mix(id) >> 7) as usize % DATA_MAX
}

/// Byte `index` of request `id`; never `0x00` or `0xff`, so neither a request nor a response
/// holds a zero byte, and a page of zeros fails every check.
pub fn request_byte(id: MessageId, index: usize) -> u8 {
    let x = mix(id) ^ (index as u32).wrapping_add(1).wrapping_mul(0x27d4_eb2f);
    match (x ^ (x >> 15) ^ (x >> 24)) as u8 {
        0x00 => 0x5a,
        0xff => 0xa5,
        byte => byte,
    }
}

/// Byte `index` of the response to request `id`.
pub fn response_byte(id: MessageId, index: usize) -> u8 {
    !request_byte(id, request_len(id) - 1 - index)
}

/// Writes request `id` with its header into `half`; returns its checksum.
pub fn write_request(id: MessageId, half: &mut Half) -> u32 {
    write(id, half, request_byte)
}

/// Writes the response to request `id` with its header into `half`; returns its checksum.
pub fn write_response(id: MessageId, half: &mut Half) -> u32 {
    write(id, half, response_byte)
}

fn write(id: MessageId, half: &mut Half, byte: fn(MessageId, usize) -> u8) -> u32 {
    let len = request_len(id);
    let data = &mut half[HEADER_BYTES..HEADER_BYTES + len];
    for (index, out) in data.iter_mut().enumerate() {
        *out = byte(id, index);
    }
    let sum = checksum(id, len as u32, data);
    Header {
        id,
        len: len as u32,
        checksum: sum,
    }
    .write(half);
    sum
}

/// What is wrong with a message that was received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The header names another message (or has another length).
    Header {
        /// The header as it read.
        found: Header,
        /// The length expected.
        expected_len: u32,
    },
    /// The header's checksum does not match the bytes.
    Checksum {
        /// In the header.
        found: u32,
        /// Of the bytes received.
        computed: u32,
    },
    /// Data bytes that differ from what the message must hold.
    Bytes(usize),
}

impl core::fmt::Display for Problem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Problem::Header {
                found,
                expected_len,
            } => write!(
                f,
                "header says seq {} lane {} source {} len {} (expected len {expected_len})",
                found.id.seq, found.id.lane, found.id.source, found.len
            ),
            Problem::Checksum { found, computed } => {
                write!(
                    f,
                    "checksum {found:#010x}, the bytes sum to {computed:#010x}"
                )
            }
            Problem::Bytes(wrong) => write!(f, "{wrong} wrong data bytes"),
        }
    }
}

/// Checks request `id` in `half`; returns its checksum.
pub fn check_request(id: MessageId, half: &Half) -> Result<u32, Problem> {
    check(id, half, request_byte)
}

/// Checks the response to request `id` in `half`; returns its checksum.
pub fn check_response(id: MessageId, half: &Half) -> Result<u32, Problem> {
    check(id, half, response_byte)
}

fn check(id: MessageId, half: &Half, byte: fn(MessageId, usize) -> u8) -> Result<u32, Problem> {
    let header = Header::read(half);
    let len = request_len(id);
    if header.id != id || header.len as usize != len {
        return Err(Problem::Header {
            found: header,
            expected_len: len as u32,
        });
    }
    let data = &half[HEADER_BYTES..HEADER_BYTES + len];
    let computed = checksum(id, header.len, data);
    if computed != header.checksum {
        return Err(Problem::Checksum {
            found: header.checksum,
            computed,
        });
    }
    let wrong = data
        .iter()
        .enumerate()
        .filter(|&(index, &b)| b != byte(id, index))
        .count();
    if wrong != 0 {
        return Err(Problem::Bytes(wrong));
    }
    Ok(computed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: MessageId = MessageId {
        source: 2,
        lane: 1,
        seq: 77,
    };

    #[test]
    fn a_request_and_its_response_check_out() {
        let mut half = [0; HALF_BYTES];
        let sum = write_request(ID, &mut half);
        assert_eq!(check_request(ID, &half), Ok(sum));
        let mut response = [0; HALF_BYTES];
        let answer = write_response(ID, &mut response);
        assert_eq!(check_response(ID, &response), Ok(answer));
        assert!(
            check_request(ID, &response).is_err(),
            "a response is no request"
        );
    }

    #[test]
    fn another_message_lane_or_domain_is_caught_by_the_header() {
        let mut half = [0; HALF_BYTES];
        write_request(ID, &mut half);
        for other in [
            MessageId { seq: 78, ..ID },
            MessageId { lane: 0, ..ID },
            MessageId { source: 3, ..ID },
        ] {
            assert!(matches!(
                check_request(other, &half),
                Err(Problem::Header { .. })
            ));
        }
    }

    #[test]
    fn a_flipped_data_byte_fails_the_checksum_and_a_zero_page_fails_the_header() {
        let mut half = [0; HALF_BYTES];
        write_request(ID, &mut half);
        half[HEADER_BYTES] ^= 0x10;
        assert!(matches!(
            check_request(ID, &half),
            Err(Problem::Checksum { .. })
        ));
        assert!(matches!(
            check_request(ID, &[0; HALF_BYTES]),
            Err(Problem::Header { .. })
        ));
    }

    #[test]
    fn bytes_that_match_their_checksum_but_not_the_message_are_counted() {
        let mut half = [0; HALF_BYTES];
        write_request(ID, &mut half);
        let len = request_len(ID);
        half[HEADER_BYTES + len - 1] ^= 0x01;
        let header = Header::read(&half);
        let forged = Header {
            checksum: checksum(ID, header.len, &half[HEADER_BYTES..HEADER_BYTES + len]),
            ..header
        };
        forged.write(&mut half);
        assert_eq!(check_request(ID, &half), Err(Problem::Bytes(1)));
    }

    #[test]
    fn lengths_stay_in_the_half_and_no_byte_is_zero() {
        for seq in 1..3_000 {
            for lane in 0..4 {
                let id = MessageId {
                    source: 1 + seq % 3,
                    lane,
                    seq,
                };
                let len = request_len(id);
                assert!((1..=DATA_MAX).contains(&len));
                if seq % 97 == 0 {
                    for index in 0..len {
                        assert_ne!(request_byte(id, index), 0);
                        assert_ne!(response_byte(id, index), 0);
                    }
                }
            }
        }
    }
}
