//! A YAML tree that remembers where every node came from.
//!
//! serde stops at the first problem and forgets positions; validation needs every
//! problem at once, each with `line:col`. This module turns yaml-rust2's marked
//! event stream into a small tree whose nodes carry their position.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in the source text, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Map(Vec<(Key, Node)>),
    Seq(Vec<Node>),
    /// A scalar with its text; `quoted` scalars are always strings.
    Scalar {
        text: String,
        quoted: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

impl Node {
    /// The word used in "expected X, found Y" messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Map(_) => "a mapping",
            Kind::Seq(_) => "a list",
            Kind::Scalar { text, quoted } => {
                if *quoted {
                    "a string"
                } else if is_null(text) {
                    "nothing (null)"
                } else if text.parse::<i64>().is_ok() {
                    "a number"
                } else if text == "true" || text == "false" {
                    "a boolean"
                } else {
                    "a string"
                }
            }
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, quoted: false } if is_null(text))
    }
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// A syntax error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Map {
        pos: Pos,
        entries: Vec<(Key, Node)>,
        pending_key: Option<Key>,
    },
    Seq {
        pos: Pos,
        items: Vec<Node>,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    documents: usize,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                Some(key) => entries.push((key, node)),
                None => match node.kind {
                    Kind::Scalar { text, .. } => {
                        *pending_key = Some(Key {
                            name: text,
                            pos: node.pos,
                        })
                    }
                    _ => {
                        if self.error.is_none() {
                            self.error = Some(SyntaxError {
                                pos: node.pos,
                                message: "mapping keys must be plain words, not lists or mappings"
                                    .into(),
                            });
                        }
                        // Keep the structure balanced: use a placeholder key.
                        *pending_key = Some(Key {
                            name: String::new(),
                            pos: node.pos,
                        });
                    }
                },
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::DocumentStart => self.documents += 1,
            Event::Scalar(text, style, _, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push_node(Node {
                    kind: Kind::Scalar { text, quoted },
                    pos,
                })
            }
            Event::SequenceStart(..) => self.stack.push(Frame::Seq {
                pos,
                items: Vec::new(),
            }),
            Event::MappingStart(..) => self.stack.push(Frame::Map {
                pos,
                entries: Vec::new(),
                pending_key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq { pos, items }) => Node {
                        kind: Kind::Seq(items),
                        pos,
                    },
                    Some(Frame::Map { pos, entries, .. }) => Node {
                        kind: Kind::Map(entries),
                        pos,
                    },
                    None => return,
                };
                self.push_node(node);
            }
            Event::Alias(_) => {
                if self.error.is_none() {
                    self.error = Some(SyntaxError {
                        pos,
                        message: "YAML aliases (*name) are not supported in scenarios: write the value out".into(),
                    });
                }
                self.push_node(Node {
                    kind: Kind::Scalar {
                        text: String::new(),
                        quoted: false,
                    },
                    pos,
                });
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Parse one YAML document into a positioned tree. An empty document is an empty map.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(SyntaxError {
            pos: Pos::from(*e.marker()),
            message: e.info().to_string(),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    if builder.documents > 1 {
        return Err(SyntaxError {
            pos: Pos { line: 1, col: 1 },
            message: "a scenario is one YAML document; found several (---)".into(),
        });
    }
    Ok(builder.root.unwrap_or(Node {
        kind: Kind::Map(Vec::new()),
        pos: Pos { line: 1, col: 1 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_point_at_values() {
        let n = parse("a: 1\nb:\n  c: [x, y]\n").unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!("not a map")
        };
        assert_eq!(entries[0].0.name, "a");
        assert_eq!(entries[0].0.pos, Pos { line: 1, col: 1 });
        assert_eq!(entries[0].1.pos, Pos { line: 1, col: 4 });
        let Kind::Map(inner) = &entries[1].1.kind else {
            panic!("not a map")
        };
        assert_eq!(inner[0].0.pos, Pos { line: 3, col: 3 });
        let Kind::Seq(items) = &inner[0].1.kind else {
            panic!("not a seq")
        };
        assert_eq!(items[1].pos, Pos { line: 3, col: 10 });
    }

    #[test]
    fn syntax_error_has_a_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e:?}");
        assert!(!e.message.is_empty());
    }

    #[test]
    fn quoted_scalars_are_strings() {
        let n = parse("a: \"12\"\nb: 12\n").unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!()
        };
        assert_eq!(entries[0].1.kind_name(), "a string");
        assert_eq!(entries[1].1.kind_name(), "a number");
    }

    #[test]
    fn empty_document_is_an_empty_map() {
        assert_eq!(parse("").unwrap().kind, Kind::Map(vec![]));
    }
}
