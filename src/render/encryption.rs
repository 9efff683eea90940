//! The API server's EncryptionConfiguration: secrets encrypted with AES-CBC under one
//! 32-byte key, with the identity provider after it so secrets written before
//! encryption was on can still be read.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// The name of the (only) key in the config.
pub const KEY_NAME: &str = "key1";

/// Render the config for `key`.
pub fn render(key: &[u8; 32]) -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
    providers:
      - aescbc:
          keys:
            - name: {KEY_NAME}
              secret: {secret}
      - identity: {{}}
",
        secret = STANDARD.encode(key)
    )
}

/// The key of a config written by [`render`], if it holds a valid 32-byte key.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    let v: serde_json::Value = yaml_serde::from_str(text).ok()?;
    if v["kind"] != "EncryptionConfiguration" {
        return None;
    }
    let secret = v["resources"][0]["providers"][0]["aescbc"]["keys"][0]["secret"].as_str()?;
    STANDARD.decode(secret).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_key() {
        let key = [7u8; 32];
        assert_eq!(parse_key(&render(&key)), Some(key));
    }

    #[test]
    fn rejects_short_keys_and_other_documents() {
        let short =
            render(&[1u8; 32]).replace(&STANDARD.encode([1u8; 32]), &STANDARD.encode([1u8; 16]));
        assert_eq!(parse_key(&short), None);
        assert_eq!(parse_key("kind: Other\n"), None);
        assert_eq!(parse_key(": not yaml ["), None);
    }
}
