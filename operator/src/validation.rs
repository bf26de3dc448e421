//! The API server's own syntax rules for the parts of a DistroCache spec
//! that end up in the StatefulSet's pod template (label and annotation keys,
//! label values, resource names and quantities), which the DistroCache
//! schema does not express: CEL over unbounded maps of strings would exceed
//! the API server's cost budget, so the CRD's CEL rules check only the cpu
//! and memory quantities, and this module the rest. A violation would
//! otherwise only surface when the StatefulSet is applied, failing every
//! reconcile; checking them up front turns that into an `InvalidSpec`
//! condition naming the field.
//!
//! The rules follow `k8s.io/apimachinery/pkg/util/validation` and
//! `k8s.io/apimachinery/pkg/api/resource`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;

/// Longest label value, and longest name part of a qualified name.
const NAME_MAX: usize = 63;
/// Longest DNS subdomain (the prefix of a qualified name).
const SUBDOMAIN_MAX: usize = 253;
/// Most bytes all annotations of one object may take (keys and values).
const ANNOTATIONS_MAX: usize = 256 * 1024;

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= NAME_MAX
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A lowercase RFC 1123 subdomain: dot-separated labels of `[a-z0-9-]`,
/// each starting and ending alphanumeric, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= SUBDOMAIN_MAX
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn check_qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_dns_subdomain(prefix)
    {
        return Err(format!(
            "{key:?}: the prefix before '/' must be a lowercase DNS subdomain (e.g. example.com)"
        ));
    }
    if !is_name_part(name) {
        return Err(format!(
            "{key:?}: the name must be 1-63 characters of letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label value: empty, or a name part.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "{value:?}: a label value must be empty or 1-63 characters of letters, digits, \
             '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// Labels: qualified-name keys and label values.
pub fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (key, value) in labels {
        check_qualified_name(key).map_err(|e| format!("{field} key {e}"))?;
        check_label_value(value).map_err(|e| format!("{field}[{key:?}] {e}"))?;
    }
    Ok(())
}

/// Annotations: qualified-name keys, at most 256 KiB in all.
pub fn check_annotations(
    field: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(), String> {
    let mut total = 0;
    for (key, value) in annotations {
        check_qualified_name(key).map_err(|e| format!("{field} key {e}"))?;
        total += key.len() + value.len();
    }
    if total > ANNOTATIONS_MAX {
        return Err(format!(
            "{field} take {total} bytes; Kubernetes allows {ANNOTATIONS_MAX}"
        ));
    }
    Ok(())
}

/// A resource quantity (`500m`, `1.5Gi`, `2e3`, `128974848`) as a number,
/// or `None` if Kubernetes would refuse it.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1.0, &s[1..]),
        b'-' => (-1.0, &s[1..]),
        _ => (1.0, s),
    };
    let number_len = rest
        .bytes()
        .position(|c| !(c.is_ascii_digit() || c == b'.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let digits_ok = match number.split_once('.') {
        // `1.`, `.5` and `1.5` are fine; `.` and `1.2.3` are not.
        Some((int, frac)) => {
            !(int.is_empty() && frac.is_empty())
                && int.bytes().all(|c| c.is_ascii_digit())
                && frac.bytes().all(|c| c.is_ascii_digit())
        }
        None => !number.is_empty(),
    };
    if !digits_ok {
        return None;
    }
    // Rust's float parser takes `.5` but not `1.`.
    let value: f64 = number.strip_suffix('.').unwrap_or(number).parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            let digits = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let exp: i32 = exponent[1..].parse().ok()?;
            10f64.powi(exp)
        }
    };
    Some(sign * value * scale)
}

/// The resources whose quantities the CRD's CEL rules check (syntax, and no
/// request above its limit), so the API server refuses them at `kubectl
/// apply`. Only these two: a rule over every name would exceed the API
/// server's cost budget.
const CHECKED_BY_CEL: [&str; 2] = ["cpu", "memory"];

/// Container resources: names a pod accepts, and for the names the CRD's
/// CEL rules leave alone, quantities that parse, none negative, and no
/// request above its limit.
pub fn check_resources(field: &str, resources: &ResourceRequirements) -> Result<(), String> {
    let mut parsed = [BTreeMap::new(), BTreeMap::new()];
    for (i, (kind, list)) in [
        ("limits", &resources.limits),
        ("requests", &resources.requests),
    ]
    .into_iter()
    .enumerate()
    {
        for (name, quantity) in list.iter().flatten() {
            let standard = matches!(name.as_str(), "cpu" | "memory" | "ephemeral-storage")
                || name.starts_with("hugepages-");
            let extended = name.contains('/') && check_qualified_name(name).is_ok();
            if !(standard || extended) {
                return Err(format!(
                    "{field}.{kind}: {name:?} is not a resource a container can ask for \
                     (cpu, memory, ephemeral-storage, hugepages-<size> or a domain-qualified \
                     extended resource)"
                ));
            }
            if CHECKED_BY_CEL.contains(&name.as_str()) {
                continue;
            }
            let value = parse_quantity(&quantity.0).ok_or_else(|| {
                format!(
                    "{field}.{kind}.{name} {:?} is not a quantity (e.g. 500m, 256Mi, 2)",
                    quantity.0
                )
            })?;
            if value < 0.0 {
                return Err(format!(
                    "{field}.{kind}.{name} {:?} must not be negative",
                    quantity.0
                ));
            }
            parsed[i].insert(name.as_str(), value);
        }
    }
    let [limits, requests] = &parsed;
    for (name, request) in requests {
        if let Some(limit) = limits.get(name)
            && request > limit
        {
            return Err(format!(
                "{field}.requests.{name} must not exceed {field}.limits.{name}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

    #[test]
    fn qualified_names_follow_the_api_server() {
        for ok in [
            "team",
            "app.kubernetes.io/name",
            "example.com/a_b-c.d",
            "A9",
            &"x".repeat(63),
        ] {
            assert!(check_qualified_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-team",
            "team-",
            "has space",
            "Example.com/x",
            "a/b/c",
            "/x",
            "x/",
            "emoji🙂",
            &"x".repeat(64),
        ] {
            assert!(check_qualified_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_values_may_be_empty_but_not_arbitrary() {
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1.2_3-a").is_ok());
        assert!(check_label_value("a/b").is_err());
        assert!(check_label_value("trailing-").is_err());
        assert!(check_label_value(&"v".repeat(64)).is_err());
        let labels = BTreeMap::from([("team".to_string(), "a b".to_string())]);
        assert!(
            check_labels("spec.podLabels", &labels)
                .unwrap_err()
                .contains("spec.podLabels[\"team\"]")
        );
    }

    #[test]
    fn annotation_values_are_free_but_bounded() {
        let ok = BTreeMap::from([("note".to_string(), "any text / at all".to_string())]);
        assert!(check_annotations("spec.podAnnotations", &ok).is_ok());
        let big = BTreeMap::from([("note".to_string(), "x".repeat(ANNOTATIONS_MAX))]);
        assert!(check_annotations("spec.podAnnotations", &big).is_err());
        let bad_key = BTreeMap::from([("not ok".to_string(), String::new())]);
        assert!(check_annotations("spec.podAnnotations", &bad_key).is_err());
    }

    #[test]
    fn quantities_parse_as_kubernetes_reads_them() {
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("1Gi"), Some(1024f64.powi(3)));
        assert_eq!(parse_quantity("1.5Ki"), Some(1536.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("1E-3"), Some(0.001));
        assert_eq!(parse_quantity(".5"), Some(0.5));
        assert_eq!(parse_quantity("1."), Some(1.0));
        assert_eq!(parse_quantity("-1"), Some(-1.0));
        assert_eq!(parse_quantity("+3k"), Some(3000.0));
        for bad in [
            "", "lots", "1 Gi", "1gi", "1GB", "Gi", ".", "1.2.3", "1e", "1e+", "1ee3", "--1",
        ] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }

    fn resources(limits: &[(&str, &str)], requests: &[(&str, &str)]) -> ResourceRequirements {
        let map = |l: &[(&str, &str)]| {
            Some(
                l.iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect(),
            )
        };
        ResourceRequirements {
            limits: map(limits),
            requests: map(requests),
            ..ResourceRequirements::default()
        }
    }

    #[test]
    fn resources_must_be_what_a_pod_accepts() {
        let f = "spec.resources";
        let ok = resources(
            &[
                ("memory", "512Mi"),
                ("cpu", "1"),
                ("ephemeral-storage", "1Gi"),
            ],
            &[
                ("memory", "256Mi"),
                ("hugepages-2Mi", "0"),
                ("example.com/gpu", "0"),
            ],
        );
        assert!(check_resources(f, &ok).is_ok());
        let err = check_resources(f, &resources(&[("gpu", "1")], &[])).unwrap_err();
        assert!(err.contains("\"gpu\""), "{err}");
        let err =
            check_resources(f, &resources(&[("ephemeral-storage", "lots")], &[])).unwrap_err();
        assert!(
            err.contains("spec.resources.limits.ephemeral-storage \"lots\""),
            "{err}"
        );
        let err = check_resources(f, &resources(&[], &[("example.com/gpu", "-1")])).unwrap_err();
        assert!(err.contains("negative"), "{err}");
        let err = check_resources(
            f,
            &resources(
                &[("ephemeral-storage", "1Gi")],
                &[("ephemeral-storage", "2Gi")],
            ),
        )
        .unwrap_err();
        assert!(err.contains("must not exceed"), "{err}");
        // cpu and memory are the CRD's CEL rules: not repeated here.
        assert!(check_resources(f, &resources(&[("memory", "lots")], &[])).is_ok());
    }
}
