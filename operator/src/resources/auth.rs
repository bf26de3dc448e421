//! The tokens of a cache with `spec.auth.enabled`: the Secret the operator
//! creates when the user names none, and where the nodes find it (mounted
//! read-only, read from files so a rotated Secret needs no image change).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, SecretVolumeSource, Volume, VolumeMount};
use kube::ResourceExt;

use super::child_meta;
use crate::crd::DistroCache;

/// Where the Secret is mounted in the node pods.
pub(crate) const AUTH_MOUNT: &str = "/etc/distrocache/auth";
pub(crate) const CLIENT_TOKEN_KEY: &str = "client-token";
pub(crate) const PEER_TOKEN_KEY: &str = "peer-token";

/// The Secret holding the tokens: the user's, or `<name>-auth`.
pub(crate) fn auth_secret_name(dc: &DistroCache) -> String {
    dc.spec
        .auth
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-auth", dc.name_any()))
}

/// A new Secret with two random 256-bit tokens (hex). The controller only
/// ever creates it, never updates it, so tokens stay stable.
pub(crate) fn generated_auth_secret(dc: &DistroCache, random: impl Fn() -> [u8; 32]) -> Secret {
    let hex = |bytes: [u8; 32]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Secret {
        metadata: child_meta(dc, auth_secret_name(dc), "auth"),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                CLIENT_TOKEN_KEY.to_owned(),
                ByteString(hex(random()).into_bytes()),
            ),
            (
                PEER_TOKEN_KEY.to_owned(),
                ByteString(hex(random()).into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}

pub(crate) fn auth_volume(dc: &DistroCache) -> Volume {
    Volume {
        name: "auth".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(auth_secret_name(dc)),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub(crate) fn auth_volume_mount() -> VolumeMount {
    VolumeMount {
        name: "auth".into(),
        mount_path: AUTH_MOUNT.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn a_generated_secret_holds_two_distinct_random_tokens() {
        let dc = cache("{auth: {enabled: true}}");
        let counter = std::cell::Cell::new(0u8);
        let secret = generated_auth_secret(&dc, || {
            counter.set(counter.get() + 1);
            [counter.get(); 32]
        });
        assert_owned(&secret.metadata, "orders-auth");
        let data = secret.data.unwrap();
        assert_eq!(data[CLIENT_TOKEN_KEY].0.len(), 64);
        assert_ne!(data[CLIENT_TOKEN_KEY], data[PEER_TOKEN_KEY]);
        assert_eq!(
            auth_secret_name(&cache("{auth: {enabled: true, secretName: mine}}")),
            "mine"
        );
    }
}
