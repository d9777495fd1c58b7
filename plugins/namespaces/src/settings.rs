//! The plugin's configuration: parsed and checked in one place, for `validate-config` at
//! start-up and for every call that needs it.

use opensandbox_plugin_sdk::config;
use opensandbox_plugin_sdk::process::{IdRange, ResourceLimits, MAX_ID_RANGES};

/// Where Debian's `bubblewrap` package installs it.
pub const DEFAULT_BWRAP: &str = "/usr/bin/bwrap";

/// The default user namespace: ids 0-65535 as they are on the host (and in the image).
pub const DEFAULT_ID_RANGE: IdRange = IdRange {
    inside: 0,
    outside: 0,
    count: 65536,
};

/// Every key the plugin reads; anything else is a mistake in the plugins file.
const KEYS: [&str; 7] = [
    "bwrap",
    "memory_limit_mib",
    "cpu_millicores",
    "max_processes",
    "limits_best_effort",
    "user_namespace",
    "id_map",
];

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The bwrap program (it must also be in the plugin's `process` grant).
    pub bwrap: String,
    /// Cgroup limits of each sandbox; `None` when no limit is configured.
    pub limits: Option<ResourceLimits>,
    /// Whether each sandbox gets its own user namespace.
    pub user_namespace: bool,
    /// The host makes it with these id ranges (every id of them exists inside); empty
    /// only without a user namespace.
    pub id_map: Vec<IdRange>,
}

/// Reads and checks the configuration; the error names the key.
pub fn load() -> Result<Settings, String> {
    for (key, _) in config::entries() {
        if !KEYS.contains(&key.as_str()) {
            return Err(format!(
                "unknown key {key:?} (known keys: {})",
                KEYS.join(", ")
            ));
        }
    }
    let bwrap = config::get("bwrap").unwrap_or_else(|| DEFAULT_BWRAP.to_string());
    if !bwrap.starts_with('/') {
        return Err(format!("bwrap: {bwrap:?} is not an absolute path"));
    }
    let memory_bytes = match positive::<u64>("memory_limit_mib")? {
        None => None,
        Some(mib) => Some(
            mib.checked_mul(1024 * 1024)
                .ok_or("memory_limit_mib: too large")?,
        ),
    };
    let cpu_millicores = positive::<u32>("cpu_millicores")?;
    let max_processes = positive::<u32>("max_processes")?;
    let best_effort = config::parse::<bool>("limits_best_effort")?.unwrap_or(true);
    let user_namespace = config::parse::<bool>("user_namespace")?.unwrap_or(true);
    let mut id_map = config::list("id_map")
        .iter()
        .map(|r| id_range(r).map_err(|e| format!("id_map: {r:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if id_map.is_empty() && user_namespace {
        // The host makes the namespace with every id of the image as it is on disk: all
        // users exist inside, and root's capabilities stay inside the namespace.
        id_map.push(DEFAULT_ID_RANGE);
    }
    if id_map.len() > MAX_ID_RANGES {
        return Err(format!("id_map: at most {MAX_ID_RANGES} ranges"));
    }
    if !id_map.is_empty() && !user_namespace {
        return Err("id_map: needs a user namespace (user_namespace = false)".to_string());
    }
    let limits = (memory_bytes.is_some() || cpu_millicores.is_some() || max_processes.is_some())
        .then_some(ResourceLimits {
            memory_bytes,
            cpu_millicores,
            max_processes,
            best_effort,
        });
    Ok(Settings {
        bwrap,
        limits,
        user_namespace,
        id_map,
    })
}

/// One `inside:outside:count` range of `id_map`, checked as the host checks it.
fn id_range(text: &str) -> Result<IdRange, String> {
    let parts: Vec<&str> = text.trim().split(':').collect();
    let [inside, outside, count] = parts[..] else {
        return Err("want inside:outside:count".to_string());
    };
    let number = |s: &str| s.parse::<u32>().map_err(|e| format!("{s:?}: {e}"));
    let range = IdRange {
        inside: number(inside)?,
        outside: number(outside)?,
        count: number(count)?,
    };
    let fits = range.count > 0
        && u64::from(range.outside) + u64::from(range.count) <= 1 << 31
        && u64::from(range.inside) + u64::from(range.count) <= u64::from(u32::MAX);
    if fits {
        Ok(range)
    } else {
        Err("count must be positive and host ids below 2^31".to_string())
    }
}

/// A whole number above zero, if set: a zero limit would stop every sandbox.
fn positive<T>(key: &str) -> Result<Option<T>, String>
where
    T: std::str::FromStr + PartialEq + Default,
    T::Err: std::fmt::Display,
{
    match config::parse::<T>(key)? {
        Some(v) if v == T::default() => Err(format!("{key}: must be above 0")),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opensandbox_plugin_sdk::testing;

    fn with(cfg: &[(&str, &str)]) -> Result<Settings, String> {
        testing::set_config(cfg.iter().copied());
        load()
    }

    #[test]
    fn defaults() {
        assert_eq!(
            with(&[]),
            Ok(Settings {
                bwrap: DEFAULT_BWRAP.to_string(),
                limits: None,
                user_namespace: true,
                id_map: vec![DEFAULT_ID_RANGE],
            })
        );
    }

    #[test]
    fn limits() {
        let s = with(&[
            ("memory_limit_mib", "512"),
            ("max_processes", "100"),
            ("limits_best_effort", "false"),
            ("user_namespace", "false"),
            ("bwrap", "/opt/bwrap"),
        ])
        .unwrap();
        assert_eq!(s.bwrap, "/opt/bwrap");
        assert!(!s.user_namespace);
        assert_eq!(
            s.limits,
            Some(ResourceLimits {
                memory_bytes: Some(512 << 20),
                cpu_millicores: None,
                max_processes: Some(100),
                best_effort: false,
            })
        );
        let s = with(&[("cpu_millicores", "1500")]).unwrap();
        assert_eq!(
            s.limits.map(|l| (l.cpu_millicores, l.best_effort)),
            Some((Some(1500), true))
        );
    }

    #[test]
    fn id_map() {
        let s = with(&[("id_map", "0:0:65536\n65536:165536:10")]).unwrap();
        assert_eq!(
            s.id_map,
            [
                IdRange {
                    inside: 0,
                    outside: 0,
                    count: 65536
                },
                IdRange {
                    inside: 65536,
                    outside: 165536,
                    count: 10
                },
            ]
        );
        let err = with(&[("id_map", "0:0:1"), ("user_namespace", "false")]).unwrap_err();
        assert!(err.starts_with("id_map:"), "{err}");
        let nine = ["0:0:1"; 9].join("\n");
        assert!(with(&[("id_map", nine.as_str())]).is_err());
    }

    #[test]
    fn errors_name_the_key() {
        for (cfg, key) in [
            (("memory", "1"), "unknown key \"memory\""),
            (("bwrap", "bwrap"), "bwrap:"),
            (("memory_limit_mib", "lots"), "memory_limit_mib:"),
            (("memory_limit_mib", "0"), "memory_limit_mib:"),
            (
                ("memory_limit_mib", "18446744073709551615"),
                "memory_limit_mib:",
            ),
            (("cpu_millicores", "-1"), "cpu_millicores:"),
            (("max_processes", "1.5"), "max_processes:"),
            (("limits_best_effort", "yes"), "limits_best_effort:"),
            (("user_namespace", "no"), "user_namespace:"),
            (("id_map", "0:0"), "id_map:"),
            (("id_map", "0:0:0"), "id_map:"),
            (("id_map", "0:x:1"), "id_map:"),
            (("id_map", "0:2147483647:2"), "id_map:"),
        ] {
            let err = with(&[cfg]).unwrap_err();
            assert!(err.contains(key), "{cfg:?}: {err}");
        }
    }
}
