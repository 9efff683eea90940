//! Pure text renderers: configuration files the lab writes or installs, from data in,
//! text out. No I/O here.

pub mod encryption;
pub mod kubeconfig;

/// A YAML double-quoted scalar: safe for any name (`system:node:n1`, `@`, spaces).
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_what_yaml_would_misread() {
        assert_eq!(super::yaml_quote("system:node:n1"), "\"system:node:n1\"");
        assert_eq!(super::yaml_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
