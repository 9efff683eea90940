//! Decoding a positioned YAML tree into typed values while collecting every
//! problem (wrong type, unknown or missing key) instead of stopping at the first.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::yaml::{Kind, Node, Pos};

/// One problem found in a scenario or profile file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// Dotted field path, e.g. `controllers.names[1]`; empty for the document.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, self.line, self.col, self.path, self.message
            )
        }
    }
}

/// Collects diagnostics and remembers where each decoded path was written.
pub struct Ctx {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
    pub(crate) positions: BTreeMap<String, Pos>,
}

impl Ctx {
    pub fn new(file: impl Into<String>) -> Self {
        Ctx {
            file: file.into(),
            diagnostics: Vec::new(),
            positions: BTreeMap::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            col: pos.col,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Report a problem about `path`, located at the nearest position known for it
    /// or for one of its parents (a defaulted field points at its section).
    pub fn error_at_path(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.pos_of(path);
        self.error(pos, path, message);
    }

    pub fn pos_of(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => {
                    return self
                        .positions
                        .get("")
                        .copied()
                        .unwrap_or(Pos { line: 1, col: 1 })
                }
            }
        }
    }

    pub fn record(&mut self, path: &str, pos: Pos) {
        self.positions.insert(path.to_string(), pos);
    }

    pub fn has_errors(&self) -> bool {
        !self.diagnostics.is_empty()
    }

    /// Whether a problem was already reported for `path` or anything under it.
    pub fn has_errors_at(&self, path: &str) -> bool {
        self.diagnostics.iter().any(|d| {
            d.path == path
                || (d.path.starts_with(path)
                    && matches!(d.path.as_bytes().get(path.len()), Some(b'.') | Some(b'[')))
        })
    }
}

/// Parse a YAML document; a syntax error becomes the one diagnostic of `file`.
pub fn parse_document(text: &str, file: &str) -> Result<Node, Diagnostic> {
    super::yaml::parse(text).map_err(|e| Diagnostic {
        file: file.to_string(),
        line: e.pos.line,
        col: e.pos.col,
        path: String::new(),
        message: format!("invalid YAML: {}", e.message),
    })
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A type that can be read from a YAML node.
pub trait FromNode: Sized {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self>;
}

fn scalar<'a>(node: &'a Node, path: &str, cx: &mut Ctx, expected: &str) -> Option<&'a str> {
    cx.record(path, node.pos);
    match &node.kind {
        Kind::Scalar { text, .. } if !node.is_null() => Some(text.as_str()),
        _ => {
            cx.error(
                node.pos,
                path,
                format!("expected {expected}, found {}", node.kind_name()),
            );
            None
        }
    }
}

impl FromNode for String {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        scalar(node, path, cx, "a string").map(str::to_string)
    }
}

impl FromNode for bool {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let text = scalar(node, path, cx, "true or false")?;
        match text {
            "true" => Some(true),
            "false" => Some(false),
            other => {
                cx.error(
                    node.pos,
                    path,
                    format!("expected true or false, found `{other}`"),
                );
                None
            }
        }
    }
}

macro_rules! unsigned {
    ($($t:ty),*) => {$(
        impl FromNode for $t {
            fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
                let text = scalar(node, path, cx, "a whole number")?;
                match text.replace('_', "").parse::<$t>() {
                    Ok(v) => Some(v),
                    Err(_) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
                        cx.error(
                            node.pos,
                            path,
                            format!("{text} is too large (at most {})", <$t>::MAX),
                        );
                        None
                    }
                    Err(_) => {
                        cx.error(node.pos, path, format!("expected a whole number, found `{text}`"));
                        None
                    }
                }
            }
        }
    )*};
}
unsigned!(u8, u16, u32, u64);

impl FromNode for Ipv4Addr {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let text = scalar(node, path, cx, "an IPv4 address")?;
        match text.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                cx.error(
                    node.pos,
                    path,
                    format!("expected an IPv4 address like 10.200.1.10, found `{text}`"),
                );
                None
            }
        }
    }
}

impl FromNode for Ipv4Network {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let text = scalar(node, path, cx, "an IPv4 CIDR")?;
        let parsed = if text.contains('/') {
            text.parse::<Ipv4Network>().ok()
        } else {
            None
        };
        match parsed {
            Some(net) if net.ip() == net.network() => Some(net),
            Some(net) => {
                cx.error(
                    node.pos,
                    path,
                    format!(
                        "`{text}` has host bits set: did you mean {}/{}?",
                        net.network(),
                        net.prefix()
                    ),
                );
                None
            }
            None => {
                cx.error(
                    node.pos,
                    path,
                    format!("expected an IPv4 CIDR like 10.100.0.0/16, found `{text}`"),
                );
                None
            }
        }
    }
}

impl<T: FromNode> FromNode for Vec<T> {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        cx.positions.entry(path.to_string()).or_insert(node.pos);
        match &node.kind {
            Kind::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match T::from_node(item, &format!("{path}[{i}]"), cx) {
                        Some(v) => out.push(v),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            _ => {
                cx.error(
                    node.pos,
                    path,
                    format!("expected a list, found {}", node.kind_name()),
                );
                None
            }
        }
    }
}

/// A closed set of words, e.g. `auto|kvm|tcg`.
pub trait Keyword: Sized + Copy + 'static {
    const WORDS: &'static [(&'static str, Self)];
}

/// Decode a keyword enum, listing the valid words on error.
pub fn keyword<T: Keyword>(node: &Node, path: &str, cx: &mut Ctx) -> Option<T> {
    let text = scalar(node, path, cx, "a keyword")?;
    if let Some((_, v)) = T::WORDS.iter().find(|(w, _)| *w == text) {
        return Some(*v);
    }
    let words: Vec<&str> = T::WORDS.iter().map(|(w, _)| *w).collect();
    cx.error(
        node.pos,
        path,
        format!("`{text}` is not one of: {}", words.join(", ")),
    );
    None
}

/// Reads the fields of one mapping, then reports unknown and duplicate keys.
pub struct MapReader<'n> {
    entries: &'n [(super::yaml::Key, Node)],
    pub pos: Pos,
    pub path: String,
    allowed: &'static [&'static str],
    used: Vec<bool>,
    /// Keys read so far, recorded into the context before their values are decoded.
    key_positions: Vec<(String, Pos)>,
}

impl<'n> MapReader<'n> {
    /// `None` (with a diagnostic) when `node` is not a mapping; null reads as empty.
    pub fn new(
        node: &'n Node,
        path: &str,
        cx: &mut Ctx,
        allowed: &'static [&'static str],
    ) -> Option<Self> {
        // A section is located at its key (`workers:`), which its parent recorded;
        // the document itself at 1:1.
        let pos = *cx
            .positions
            .entry(path.to_string())
            .or_insert(if path.is_empty() {
                Pos { line: 1, col: 1 }
            } else {
                node.pos
            });
        let entries: &'n [(super::yaml::Key, Node)] = match &node.kind {
            Kind::Map(e) => e,
            _ if node.is_null() => &[],
            _ => {
                cx.error(
                    node.pos,
                    path,
                    format!(
                        "expected a mapping of {}, found {}",
                        allowed.join(", "),
                        node.kind_name()
                    ),
                );
                return None;
            }
        };
        Some(MapReader {
            entries,
            pos,
            path: path.to_string(),
            allowed,
            used: vec![false; entries.len()],
            key_positions: Vec::new(),
        })
    }

    pub fn child_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The node under `key`, if present and not null.
    pub fn node(&mut self, key: &str) -> Option<&'n Node> {
        debug_assert!(self.allowed.contains(&key), "{key} not declared");
        let i = self.entries.iter().position(|(k, _)| k.name == key)?;
        self.used[i] = true;
        let (k, node) = &self.entries[i];
        self.key_positions.push((self.child_path(key), k.pos));
        (!node.is_null()).then_some(node)
    }

    /// Record the positions of keys read so far. A key never overrides a position
    /// already recorded for its path (its value's, when the caller decoded it by hand).
    fn flush(&mut self, cx: &mut Ctx) {
        for (p, pos) in self.key_positions.drain(..) {
            cx.positions.entry(p).or_insert(pos);
        }
    }

    /// The node under `key` for a nested section, its key position recorded.
    pub fn section(&mut self, key: &str, cx: &mut Ctx) -> Option<&'n Node> {
        let node = self.node(key);
        self.flush(cx);
        node
    }

    pub fn opt<T: FromNode>(&mut self, key: &str, cx: &mut Ctx) -> Option<T> {
        let node = self.node(key)?;
        self.flush(cx);
        T::from_node(node, &self.child_path(key), cx)
    }

    pub fn opt_keyword<T: Keyword>(&mut self, key: &str, cx: &mut Ctx) -> Option<T> {
        let node = self.node(key)?;
        self.flush(cx);
        keyword(node, &self.child_path(key), cx)
    }

    pub fn req<T: FromNode>(&mut self, key: &str, cx: &mut Ctx) -> Option<T> {
        match self.node(key) {
            Some(node) => {
                self.flush(cx);
                T::from_node(node, &self.child_path(key), cx)
            }
            None => {
                cx.error(
                    self.pos,
                    &self.child_path(key),
                    format!("missing required field `{key}`"),
                );
                None
            }
        }
    }

    /// Report keys that were never read (unknown) and keys written twice.
    pub fn finish(self, cx: &mut Ctx) {
        for (i, (key, _)) in self.entries.iter().enumerate() {
            let path = self.child_path(&key.name);
            if self.entries[..i].iter().any(|(k, _)| k.name == key.name) {
                cx.error(
                    key.pos,
                    &path,
                    format!("field `{}` is given twice", key.name),
                );
            } else if !self.used[i] && !self.allowed.contains(&key.name.as_str()) {
                cx.error(
                    key.pos,
                    &path,
                    format!(
                        "unknown field `{}`, expected one of: {}",
                        key.name,
                        self.allowed.join(", ")
                    ),
                );
            }
        }
    }
}
