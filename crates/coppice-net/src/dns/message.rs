//! DNS messages as far as the forwarder reads them (RFC 1035 section 4): the header, the
//! one question, and the answer section's A and CNAME records.
//!
//! Nothing here trusts a length or a pointer: every read is bounds-checked, a compression
//! pointer must point before the previous one (so a loop cannot be followed), and a name is
//! at most 255 bytes on the wire. The forwarder never rewrites a message; this only decides
//! whom to answer, with what error, and which addresses an answer holds.

use std::fmt::Write;
use std::net::Ipv4Addr;

/// The fixed header's length.
pub(crate) const HEADER_LEN: usize = 12;
/// Record type A (an IPv4 address).
pub(crate) const TYPE_A: u16 = 1;
/// Record type CNAME (an alias).
pub(crate) const TYPE_CNAME: u16 = 5;
/// Class IN.
pub(crate) const CLASS_IN: u16 = 1;
/// Response code: the query could not be parsed.
pub(crate) const FORMERR: u8 = 1;
/// Response code: no upstream answered.
pub(crate) const SERVFAIL: u8 = 2;
/// Response code: the opcode is not supported.
pub(crate) const NOTIMP: u8 = 4;

/// Longest name on the wire, length bytes included.
const MAX_NAME_WIRE: usize = 255;
/// Longest CNAME chain followed inside one answer.
const MAX_CHAIN: usize = 16;

/// Why a message was not understood (for the debug log).
pub(crate) type Malformed = &'static str;

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) id: u16,
    flags: u16,
    qdcount: u16,
    ancount: u16,
}

impl Header {
    pub(crate) fn parse(msg: &[u8]) -> Result<Self, Malformed> {
        if msg.len() < HEADER_LEN {
            return Err("shorter than a header");
        }
        Ok(Self {
            id: be16(msg, 0),
            flags: be16(msg, 2),
            qdcount: be16(msg, 4),
            ancount: be16(msg, 6),
        })
    }

    pub(crate) fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    pub(crate) fn opcode(&self) -> u8 {
        (self.flags.to_be_bytes()[0] >> 3) & 0xf
    }

    pub(crate) fn rcode(&self) -> u8 {
        self.flags.to_be_bytes()[1] & 0xf
    }
}

/// A name in canonical text form: labels joined by dots, ASCII lowercased, any byte other
/// than a letter, digit, `-` or `_` written `\DDD` (so a label holding a dot can never pass
/// for two labels), no trailing dot; the root is the empty string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Name(String);

impl Name {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// The question of a query or a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Question {
    pub(crate) name: Name,
    pub(crate) qtype: u16,
    pub(crate) qclass: u16,
}

/// A query the forwarder accepts: one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    pub(crate) header: Header,
    pub(crate) question: Question,
    /// Where the question ends (the header and question are copied into error replies).
    question_end: usize,
}

/// Parses a query: a header that is not a response's and exactly one question.
pub(crate) fn parse_query(msg: &[u8]) -> Result<Query, Malformed> {
    let header = Header::parse(msg)?;
    if header.is_response() {
        return Err("a response, not a query");
    }
    if header.qdcount != 1 {
        return Err("not exactly one question");
    }
    let (question, question_end) = read_question(msg, HEADER_LEN)?;
    Ok(Query {
        header,
        question,
        question_end,
    })
}

/// A reply to `query` with `rcode` and its question, no records: for an opcode the
/// forwarder does not handle and for a query no upstream answered.
pub(crate) fn error_reply(query: &[u8], parsed: &Query, rcode: u8) -> Vec<u8> {
    let mut out = query[..parsed.question_end].to_vec();
    set_reply_flags(&mut out, rcode);
    // One question, no records (a query's EDNS record is not echoed).
    out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out
}

/// FORMERR for a query that did not parse, if it at least has a header to answer to (and
/// is not itself a response, which would make two forwarders bounce it forever).
pub(crate) fn formerr(query: &[u8]) -> Option<Vec<u8>> {
    let header = Header::parse(query).ok()?;
    if header.is_response() {
        return None;
    }
    let mut out = query[..HEADER_LEN].to_vec();
    set_reply_flags(&mut out, FORMERR);
    out[4..12].fill(0);
    Some(out)
}

/// Makes a query header a reply's: QR and RA set, opcode and RD kept, `rcode`.
fn set_reply_flags(header: &mut [u8], rcode: u8) {
    let opcode_rd = header[2] & 0x79;
    header[2] = 0x80 | opcode_rd;
    header[3] = 0x80 | (rcode & 0xf);
}

/// Whether `msg` is the response to `query`: same id, and the same question (or none, for
/// an error the upstream could not tie to one).
pub(crate) fn answers(msg: &[u8], query: &Query) -> bool {
    let Ok(header) = Header::parse(msg) else {
        return false;
    };
    if !header.is_response() || header.id != query.header.id {
        return false;
    }
    match header.qdcount {
        0 => header.rcode() != 0,
        1 => read_question(msg, HEADER_LEN).is_ok_and(|(q, _)| q == query.question),
        _ => false,
    }
}

/// One record of the answer section, as much of it as the forwarder uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) name: Name,
    pub(crate) ttl: u32,
    pub(crate) data: Data,
}

/// A record's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Data {
    A(Ipv4Addr),
    Cname(Name),
    /// Another type or class: kept out of the way.
    Other,
}

/// A response's code, question and answer records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) rcode: u8,
    pub(crate) question: Question,
    pub(crate) answers: Vec<Record>,
}

/// Parses a response with one question and its answer section (the authority and
/// additional sections are never read: addresses there are not answers).
pub(crate) fn parse_response(msg: &[u8]) -> Result<Response, Malformed> {
    let header = Header::parse(msg)?;
    if !header.is_response() {
        return Err("a query, not a response");
    }
    if header.qdcount != 1 {
        return Err("not exactly one question");
    }
    let (question, mut at) = read_question(msg, HEADER_LEN)?;
    let mut answers = Vec::new();
    for _ in 0..header.ancount {
        let (name, after) = read_name(msg, at)?;
        let fixed = msg.get(after..after + 10).ok_or("truncated record")?;
        let (rtype, class) = (be16(fixed, 0), be16(fixed, 2));
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let len = usize::from(be16(fixed, 8));
        let start = after + 10;
        let rdata = msg.get(start..start + len).ok_or("truncated record data")?;
        let data = match (rtype, class) {
            (TYPE_A, CLASS_IN) => {
                let octets: [u8; 4] = rdata.try_into().map_err(|_| "an A record not 4 bytes")?;
                Data::A(Ipv4Addr::from(octets))
            }
            (TYPE_CNAME, CLASS_IN) => {
                // The target may point anywhere earlier in the message, and must end inside
                // the record's data.
                let (target, end) = read_name(msg, start)?;
                if end > start + len {
                    return Err("a CNAME target past its record");
                }
                Data::Cname(target)
            }
            _ => Data::Other,
        };
        answers.push(Record { name, ttl, data });
        at = start + len;
    }
    Ok(Response {
        rcode: header.rcode(),
        question,
        answers,
    })
}

/// The IPv4 addresses the answer gives for `name`: its A records, and those of the names a
/// CNAME chain inside the answer leads to, each with the smallest TTL along its chain (an
/// alias expires with its shortest link). Each address once, with its longest TTL.
pub(crate) fn addresses(response: &Response, name: &Name) -> Vec<(Ipv4Addr, u32)> {
    // The names reached so far and the TTL of the chain that reached each.
    let mut reached: Vec<(&Name, u32)> = vec![(name, u32::MAX)];
    for _ in 0..MAX_CHAIN {
        let mut more = Vec::new();
        for r in &response.answers {
            let Data::Cname(target) = &r.data else {
                continue;
            };
            let Some(&(_, ttl)) = reached.iter().find(|(n, _)| *n == &r.name) else {
                continue;
            };
            let known = reached.iter().chain(&more).any(|(n, _)| *n == target);
            if !known {
                more.push((target, ttl.min(r.ttl)));
            }
        }
        if more.is_empty() {
            break;
        }
        reached.extend(more);
    }
    let mut out: Vec<(Ipv4Addr, u32)> = Vec::new();
    for r in &response.answers {
        let Data::A(addr) = r.data else { continue };
        let Some(&(_, chain)) = reached.iter().find(|(n, _)| *n == &r.name) else {
            continue;
        };
        let ttl = chain.min(r.ttl);
        match out.iter_mut().find(|(a, _)| *a == addr) {
            Some(seen) => seen.1 = seen.1.max(ttl),
            None => out.push((addr, ttl)),
        }
    }
    out
}

/// Reads a question at `at`: name, type, class. Returns it and where it ends.
fn read_question(msg: &[u8], at: usize) -> Result<(Question, usize), Malformed> {
    let (name, after) = read_name(msg, at)?;
    let fixed = msg.get(after..after + 4).ok_or("truncated question")?;
    Ok((
        Question {
            name,
            qtype: be16(fixed, 0),
            qclass: be16(fixed, 2),
        },
        after + 4,
    ))
}

/// Reads a name at `at`, following compression pointers. Returns it and where the name
/// ends in the record that holds it (after its first pointer, if it has one).
pub(crate) fn read_name(msg: &[u8], at: usize) -> Result<(Name, usize), Malformed> {
    let mut text = String::new();
    let mut pos = at;
    let mut end = None;
    let mut wire = 0;
    // Every pointer must point before the previous one (or before itself, for the first):
    // a compressor only points back at names it wrote earlier, and this rules out loops.
    let mut limit = at;
    loop {
        let len = *msg.get(pos).ok_or("a name runs past the message")?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                return Ok((Name(text), end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let len = usize::from(len);
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or("a label runs past the message")?;
                wire += 1 + len;
                if wire + 1 > MAX_NAME_WIRE {
                    return Err("a name longer than 255 bytes");
                }
                if !text.is_empty() {
                    text.push('.');
                }
                for &b in label {
                    if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                        text.push(char::from(b.to_ascii_lowercase()));
                    } else {
                        let _ = write!(text, "\\{b:03}");
                    }
                }
                pos += 1 + len;
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or("a pointer runs past the message")?;
                let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                if target >= limit.min(pos) {
                    return Err("a compression pointer that does not point back");
                }
                end.get_or_insert(pos + 2);
                limit = target;
                pos = target;
            }
            _ => return Err("an extended label type"),
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Messages built by hand, for the tests of this crate (the forwarder never builds one).
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    /// `name` in wire form, uncompressed.
    pub(crate) fn name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(u8::try_from(label.len()).unwrap());
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A recursive query for `name` of type `qtype`.
    pub(crate) fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        out.extend(super::build::name(name));
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out
    }

    /// The response to `query` with `rcode` and `records` (owner, TTL, data) in the answer
    /// section; owners and CNAME targets equal to the question's name are compressed to a
    /// pointer at it, as real servers do.
    pub(crate) fn response(query: &[u8], rcode: u8, records: &[(&str, u32, Data)]) -> Vec<u8> {
        let parsed = parse_query(query).unwrap();
        let mut out = query[..parsed.question_end].to_vec();
        out[2] |= 0x80;
        out[3] = 0x80 | rcode;
        let count = u16::try_from(records.len()).unwrap();
        out[6..8].copy_from_slice(&count.to_be_bytes());
        out[8..12].fill(0);
        let qname = parsed.question.name.as_str().to_owned();
        let encode = |n: &str| {
            if n == qname {
                vec![0xc0, 12]
            } else {
                super::build::name(n)
            }
        };
        for (owner, ttl, data) in records {
            out.extend(encode(owner));
            let (rtype, rdata) = match data {
                Data::A(a) => (TYPE_A, a.octets().to_vec()),
                Data::Cname(target) => (TYPE_CNAME, encode(target.as_str())),
                Data::Other => (16, b"\x04text".to_vec()),
            };
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&u16::try_from(rdata.len()).unwrap().to_be_bytes());
            out.extend(rdata);
        }
        out
    }

    /// A name as the parser gives it.
    pub(crate) fn canonical(s: &str) -> Name {
        Name(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::build::{canonical, query, response};
    use super::*;

    fn a(s: &str) -> Data {
        Data::A(s.parse().unwrap())
    }

    fn cname(s: &str) -> Data {
        Data::Cname(canonical(s))
    }

    #[test]
    fn a_query_parses_to_its_lowercased_question() {
        let q = query(0x1234, "WWW.Example.COM", TYPE_A);
        let parsed = parse_query(&q).unwrap();
        assert_eq!(parsed.header.id, 0x1234);
        assert_eq!(parsed.header.opcode(), 0);
        assert_eq!(parsed.question.name.as_str(), "www.example.com");
        assert_eq!(parsed.question.qtype, TYPE_A);
        assert_eq!(parsed.question.qclass, CLASS_IN);
        let root = parse_query(&query(1, "", TYPE_A)).unwrap();
        assert_eq!(root.question.name.as_str(), "");
    }

    #[test]
    fn odd_bytes_in_labels_are_escaped_so_they_match_nothing_by_accident() {
        // One label "fake.test" is not the two labels "fake" and "test".
        let mut q = query(1, "x", TYPE_A);
        let tail = q.split_off(HEADER_LEN);
        q.extend_from_slice(b"\x09fake.test\x00");
        q.extend_from_slice(&tail[3..]);
        let parsed = parse_query(&q).unwrap();
        assert_eq!(parsed.question.name.as_str(), "fake\\046test");
        let (name, _) = read_name(b"\x03a b\x02\xc3\xbc\x00", 0).unwrap();
        assert_eq!(name.as_str(), "a\\032b.\\195\\188");
    }

    #[test]
    fn compression_pointers_are_followed_only_backwards() {
        // "example.com" at 0, then "www" + pointer to 0 at 13.
        let mut msg = build::name("example.com");
        msg.extend_from_slice(b"\x03www\xc0\x00");
        let (name, end) = read_name(&msg, 13).unwrap();
        assert_eq!(name.as_str(), "www.example.com");
        assert_eq!(end, msg.len());
        // A pointer to itself, a pointer forwards, a loop of two, and one past the end.
        for bad in [
            &b"\xc0\x00"[..],
            b"\xc0\x02\x00",
            b"\x01a\xc0\x05\x01b\xc0\x00",
            b"\x01a\xc0\xff",
        ] {
            assert!(read_name(bad, 0).is_err(), "{bad:?}");
        }
        let looped = b"\x01a\x00\x01b\xc0\x05";
        assert!(read_name(looped, 3).is_err(), "pointing at itself");
    }

    #[test]
    fn malformed_queries_are_refused_without_panicking() {
        let good = query(7, "example.com", TYPE_A);
        // Every truncation of a good query, and a few broken ones.
        for n in 0..good.len() {
            assert!(parse_query(&good[..n]).is_err(), "{n}");
        }
        let mut two = good.clone();
        two[5] = 2;
        let mut answer = good.clone();
        answer[2] |= 0x80;
        let mut long = query(7, "", TYPE_A);
        long.truncate(HEADER_LEN);
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut extended = good.clone();
        extended[HEADER_LEN] = 0x47;
        for bad in [two, answer, long, extended] {
            assert!(parse_query(&bad).is_err(), "{bad:?}");
        }
        // Any bytes at all: no panic in any of the parsers.
        let mut seed = 0x2545_f491_u32;
        for len in 0..600 {
            let junk: Vec<u8> = (0..len % 80)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed.to_be_bytes()[0]
                })
                .collect();
            let _ = parse_query(&junk);
            let _ = parse_response(&junk);
            let _ = formerr(&junk);
            let _ = read_name(&junk, 0);
        }
    }

    #[test]
    fn error_replies_keep_the_id_and_question() {
        let q = query(0xbeef, "example.com", TYPE_A);
        let formerr = formerr(&q).unwrap();
        assert_eq!(formerr.len(), HEADER_LEN);
        let h = Header::parse(&formerr).unwrap();
        assert!(h.is_response() && h.id == 0xbeef && h.rcode() == FORMERR);
        assert_eq!(crate::dns::message::formerr(&q[..5]), None);
        assert_eq!(
            crate::dns::message::formerr(&formerr),
            None,
            "never answer a response"
        );
        let parsed = parse_query(&q).unwrap();
        let fail = error_reply(&q, &parsed, SERVFAIL);
        assert!(answers(&fail, &parsed));
        let r = parse_response(&fail).unwrap();
        assert_eq!(r.rcode, SERVFAIL);
        assert_eq!(r.question, parsed.question);
        assert!(r.answers.is_empty());
        // Recursion desired is kept, and recursion available is set.
        assert_eq!(fail[2] & 0x01, 0x01);
        assert_eq!(fail[3] & 0x80, 0x80);
    }

    #[test]
    fn a_response_must_carry_the_query_s_id_and_question() {
        let q = query(9, "example.com", TYPE_A);
        let parsed = parse_query(&q).unwrap();
        let ok = response(&q, 0, &[("example.com", 60, a("198.51.100.7"))]);
        assert!(answers(&ok, &parsed));
        let mut other_id = ok.clone();
        other_id[1] = 10;
        let other_name = response(&query(9, "example.org", TYPE_A), 0, &[]);
        let other_type = response(&query(9, "example.com", 28), 0, &[]);
        for bad in [other_id, other_name, other_type, q.clone()] {
            assert!(!answers(&bad, &parsed), "{bad:?}");
        }
    }

    #[test]
    fn addresses_follow_cname_chains_inside_the_answer() {
        let q = query(1, "www.example.com", TYPE_A);
        let r = response(
            &q,
            0,
            &[
                ("www.example.com", 300, cname("edge.cdn.test")),
                ("edge.cdn.test", 40, cname("node.cdn.test")),
                ("node.cdn.test", 600, a("198.51.100.10")),
                ("node.cdn.test", 20, a("198.51.100.11")),
                // Not on the chain: an A record for an unrelated name, smuggled in.
                ("evil.test", 600, a("198.51.100.66")),
                // A TXT record on the chain carries no address.
                ("node.cdn.test", 600, Data::Other),
            ],
        );
        let parsed = parse_response(&r).unwrap();
        assert_eq!(parsed.answers.len(), 6);
        let got = addresses(&parsed, &canonical("www.example.com"));
        assert_eq!(
            got,
            [
                ("198.51.100.10".parse().unwrap(), 40),
                ("198.51.100.11".parse().unwrap(), 20)
            ]
        );
        // A chain that loops ends; the name itself is the only one with an address.
        let looped = response(
            &q,
            0,
            &[
                ("www.example.com", 60, cname("a.test")),
                ("a.test", 60, cname("www.example.com")),
                ("www.example.com", 60, a("198.51.100.12")),
                ("www.example.com", 90, a("198.51.100.12")),
            ],
        );
        let got = addresses(
            &parse_response(&looped).unwrap(),
            &canonical("www.example.com"),
        );
        assert_eq!(got, [("198.51.100.12".parse().unwrap(), 90)]);
    }

    #[test]
    fn broken_responses_do_not_parse() {
        let q = query(1, "example.com", TYPE_A);
        let good = response(&q, 0, &[("example.com", 60, a("198.51.100.7"))]);
        parse_response(&good).unwrap();
        for n in HEADER_LEN..good.len() {
            assert!(parse_response(&good[..n]).is_err(), "{n}");
        }
        // An A record of 5 bytes.
        let mut five = good.clone();
        let len_at = good.len() - 6;
        five[len_at + 1] = 5;
        five.push(0);
        assert_eq!(parse_response(&five), Err("an A record not 4 bytes"));
        // A CNAME whose target runs past its record's length.
        let mut c = response(&q, 0, &[("example.com", 60, cname("a.test"))]);
        let rdlen_at = c.len() - build::name("a.test").len() - 2;
        c[rdlen_at + 1] = 2;
        assert_eq!(parse_response(&c), Err("a CNAME target past its record"));
    }
}
