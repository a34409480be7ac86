//! The host's secret key, and the two things it is for: ids of what plugins produce
//! (publishes, broadcasts, dead letters) that outsiders cannot predict, and signatures on the
//! records of the shared fan-out log, so that only an Owlery host can put a broadcast there.
//!
//! Ids must still be the same on every host that shares a log (a redelivered batch, or a
//! second host, makes the same output, which the log then keeps once), so the key is
//! derived from a secret those hosts share: `cluster_secret` when set; on Iggy without it,
//! the Iggy credentials and stream (whoever holds those could write into Owlery's topics
//! anyway); on the embedded log, which only one host uses, a random secret kept in the
//! data directory.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest `cluster_secret` accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the host key {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the host key {path} is not {MIN_SECRET_BYTES} bytes or more; delete it to make a new one")]
    Short { path: PathBuf },
    #[error("making a random host key: {0}")]
    Random(#[from] getrandom::Error),
}

/// A key derived from a secret; cheap to clone.
#[derive(Clone)]
pub struct HostKey(std::sync::Arc<[u8; 32]>);

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostKey(..)")
    }
}

impl HostKey {
    /// The key of `secret` (any length; callers enforce a minimum where a person chose it).
    pub fn from_secret(secret: &[u8]) -> HostKey {
        HostKey(std::sync::Arc::new(mac(b"owlery host key v1", &[secret])))
    }

    /// The key the hosts sharing an Iggy stream agree on without a `cluster_secret`.
    pub fn from_iggy_credentials(username: &str, password: &str, stream: &str) -> HostKey {
        let secret = mac(b"owlery iggy credentials v1", &[username.as_bytes(), password.as_bytes(), stream.as_bytes()]);
        HostKey::from_secret(&secret)
    }

    /// The key kept in `path`, made (32 random bytes, readable by the owner only) if absent.
    pub fn load_or_create(path: &Path) -> Result<HostKey, KeyError> {
        let io = |source| KeyError::Io { path: path.to_owned(), source };
        match std::fs::read(path) {
            Ok(secret) if secret.len() >= MIN_SECRET_BYTES => return Ok(HostKey::from_secret(&secret)),
            Ok(_) => return Err(KeyError::Short { path: path.to_owned() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Written aside and renamed, so a crash never leaves a short key behind.
        let aside = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        {
            use std::io::Write;
            let mut file = options.open(&aside).map_err(io)?;
            file.write_all(&secret).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&aside, path).map_err(io)?;
        Ok(HostKey::from_secret(&secret))
    }

    /// The id named `name` (for example `owlery/alerts/<cause>/0`): the same for every host
    /// with this key, unpredictable without it.
    pub fn id(&self, name: &str) -> uuid::Uuid {
        let digest = mac(&self.0[..], &[b"id", name.as_bytes()]);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Uuid::new_v8(bytes)
    }

    /// The signature of `parts`, as hex.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        let digest = mac(&self.0[..], &[&signed_message(parts)]);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `signature` is this key's signature of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], signature: &str) -> bool {
        let Some(bytes) = from_hex(signature) else { return false };
        let mut mac = HmacSha256::new_from_slice(&self.0[..]).expect("HMAC takes any key length");
        mac.update(&signed_message(parts));
        mac.verify_slice(&bytes).is_ok()
    }
}

/// `parts` after a label, each with its length before it, so no two lists sign alike.
fn signed_message(parts: &[&[u8]]) -> Vec<u8> {
    let mut message = b"sig".to_vec();
    for part in parts {
        message.extend_from_slice(&(part.len() as u64).to_be_bytes());
        message.extend_from_slice(part);
    }
    message
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_agree_for_one_key_and_differ_across_keys() {
        let a = HostKey::from_secret(b"a shared secret of thirty-two bytes!");
        let b = HostKey::from_secret(b"another secret of thirty-two bytes!!");
        assert_eq!(a.id("owlery/p/e1/0"), a.clone().id("owlery/p/e1/0"));
        assert_ne!(a.id("owlery/p/e1/0"), a.id("owlery/p/e1/1"));
        assert_ne!(a.id("owlery/p/e1/0"), b.id("owlery/p/e1/0"));
        assert_eq!(a.id("x").get_version_num(), 8);
    }

    #[test]
    fn signatures_verify_only_with_the_key_and_the_same_parts() {
        let key = HostKey::from_secret(b"k");
        let signature = key.sign(&[b"ab", b"c"]);
        assert!(key.verify(&[b"ab", b"c"], &signature));
        assert!(!key.verify(&[b"a", b"bc"], &signature), "lengths are signed too");
        assert!(!HostKey::from_secret(b"other").verify(&[b"ab", b"c"], &signature));
        assert!(!key.verify(&[b"ab", b"c"], "zz"));
        assert!(!key.verify(&[b"ab", b"c"], ""));
    }

    #[test]
    fn a_kept_key_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/host.key");
        let first = HostKey::load_or_create(&path).unwrap();
        let again = HostKey::load_or_create(&path).unwrap();
        assert_eq!(first.id("x"), again.id("x"));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(HostKey::load_or_create(&path), Err(KeyError::Short { .. })));
    }
}
