//! Checksums: the `sha256:HEX` / `sha512:HEX` notation, incremental hashing, and
//! the `SHA256SUMS` / `SHA512SUMS` files distributions publish beside their images.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use sha2::Digest;

/// A hash algorithm the cache can verify with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub const ALL: &'static [Algorithm] = &[Algorithm::Sha256, Algorithm::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the digest written in hex.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.iter().copied().find(|a| a.name() == name)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An expected or computed digest, written `sha256:HEX` (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checksum {
    pub algorithm: Algorithm,
    hex: String,
}

/// Why a `sha256:HEX` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumParseError {
    #[error("expected ALGORITHM:HEX like sha256:9f86d0…, found `{0}`")]
    NoAlgorithm(String),
    #[error("unknown checksum algorithm `{0}` (known: sha256, sha512)")]
    UnknownAlgorithm(String),
    #[error("a {algorithm} digest is {expected} hex digits, found {found}")]
    WrongLength {
        algorithm: Algorithm,
        expected: usize,
        found: usize,
    },
    #[error("a digest is written in hex digits (0-9, a-f), found `{0}`")]
    NotHex(String),
}

impl Checksum {
    /// A checksum from an algorithm and hex digits (case-insensitive).
    pub fn new(algorithm: Algorithm, hex: &str) -> Result<Checksum, ChecksumParseError> {
        if hex.len() != algorithm.hex_len() {
            return Err(ChecksumParseError::WrongLength {
                algorithm,
                expected: algorithm.hex_len(),
                found: hex.len(),
            });
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ChecksumParseError::NotHex(hex.to_string()));
        }
        Ok(Checksum {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `sha256:0123abcd…` — the algorithm and the first 12 digits, for tables.
    pub fn short(&self) -> String {
        format!("{}:{}…", self.algorithm, &self.hex[..12])
    }
}

impl FromStr for Checksum {
    type Err = ChecksumParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| ChecksumParseError::NoAlgorithm(s.to_string()))?;
        let algorithm = Algorithm::from_name(&alg.to_ascii_lowercase())
            .ok_or_else(|| ChecksumParseError::UnknownAlgorithm(alg.to_string()))?;
        Checksum::new(algorithm, hex)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl serde::Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental hash of one algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Checksum {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Checksum { algorithm, hex }
    }
}

/// Hash everything `reader` yields; returns the digest and the byte count.
pub fn hash_reader(
    algorithm: Algorithm,
    mut reader: impl Read,
) -> std::io::Result<(Checksum, u64)> {
    let mut hasher = Hasher::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finish(), total))
}

/// Hash a whole file (blocking).
pub fn hash_file(algorithm: Algorithm, path: &Path) -> std::io::Result<(Checksum, u64)> {
    hash_reader(algorithm, std::fs::File::open(path)?)
}

/// Why a checksum file gave no digest for a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SumsError {
    #[error("no line for `{file}`")]
    Missing { file: String },
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("`{file}` is listed twice with different digests (lines {first} and {second})")]
    Conflict {
        file: String,
        first: usize,
        second: usize,
    },
}

/// Find `file`'s digest in a checksum file of `algorithm`.
///
/// Accepts the coreutils forms `HASH  NAME` (text mode) and `HASH *NAME` (binary
/// mode), an optional `./` before the name, and the BSD form `SHA256 (NAME) = HASH`.
/// Blank lines and `#` comments are skipped. Lines of other files are only checked
/// loosely (a malformed line about another file is not an error), but the line for
/// `file` must carry a digest of the right length.
pub fn find_in_sums(text: &str, algorithm: Algorithm, file: &str) -> Result<Checksum, SumsError> {
    let mut found: Option<(usize, Checksum)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim_end_matches('\r').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, digest)) = split_sums_line(line) else {
            continue;
        };
        let name = name.strip_prefix("./").unwrap_or(name);
        if name != file {
            continue;
        }
        let sum = Checksum::new(algorithm, digest).map_err(|e| SumsError::BadLine {
            line: line_no,
            reason: e.to_string(),
        })?;
        match &found {
            Some((first, prev)) if *prev != sum => {
                return Err(SumsError::Conflict {
                    file: file.to_string(),
                    first: *first,
                    second: line_no,
                })
            }
            Some(_) => {}
            None => found = Some((line_no, sum)),
        }
    }
    found.map(|(_, s)| s).ok_or_else(|| SumsError::Missing {
        file: file.to_string(),
    })
}

/// Split one line into (file name, hex digest), or `None` when it has neither form.
fn split_sums_line(line: &str) -> Option<(&str, &str)> {
    // BSD tag form: `SHA256 (name) = hex`.
    if let Some(open) = line.find(" (") {
        if let Some(close) = line.rfind(") = ") {
            if close > open && line[..open].bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Some((&line[open + 2..close], line[close + 4..].trim()));
            }
        }
    }
    // coreutils form: digest, one space, then a space (text) or `*` (binary), name.
    let (digest, rest) = line.split_once(char::is_whitespace)?;
    if !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let rest = rest.trim_start_matches(' ');
    let name = rest.strip_prefix('*').unwrap_or(rest);
    (!name.is_empty()).then_some((name, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_the_notation() {
        let c: Checksum = format!("SHA256:{}", EMPTY256.to_uppercase())
            .parse()
            .unwrap();
        assert_eq!(c.to_string(), format!("sha256:{EMPTY256}"));
        assert!(matches!(
            "md5:abc".parse::<Checksum>(),
            Err(ChecksumParseError::UnknownAlgorithm(_))
        ));
        assert!(matches!(
            "sha256:abc".parse::<Checksum>(),
            Err(ChecksumParseError::WrongLength { found: 3, .. })
        ));
        assert!(matches!(
            EMPTY256.parse::<Checksum>(),
            Err(ChecksumParseError::NoAlgorithm(_))
        ));
        let zz = format!("sha256:{}zz", &EMPTY256[..62]);
        assert!(matches!(
            zz.parse::<Checksum>(),
            Err(ChecksumParseError::NotHex(_))
        ));
    }

    #[test]
    fn hashes_known_values() {
        let (c, n) = hash_reader(Algorithm::Sha256, &b""[..]).unwrap();
        assert_eq!((c.hex(), n), (EMPTY256, 0));
        let (c, _) = hash_reader(Algorithm::Sha512, &b"abc"[..]).unwrap();
        assert!(c.hex().starts_with("ddaf35a193617aba"), "{c}");
    }

    #[test]
    fn bsd_form_is_understood() {
        let text = format!("SHA256 (disk.img) = {EMPTY256}\n");
        let c = find_in_sums(&text, Algorithm::Sha256, "disk.img").unwrap();
        assert_eq!(c.hex(), EMPTY256);
    }

    #[test]
    fn conflicting_lines_are_an_error() {
        let other = "a".repeat(64);
        let text = format!("{EMPTY256}  f\n{other} *f\n");
        assert!(matches!(
            find_in_sums(&text, Algorithm::Sha256, "f"),
            Err(SumsError::Conflict { .. })
        ));
    }
}
