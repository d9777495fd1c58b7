//! `default-policy`: the first-party runtime-selection policy.
//!
//! For each new sandbox, in this order:
//!
//! 1. If the client named a runtime, select it when it is a healthy candidate under its cap;
//!    otherwise reject the creation, saying why.
//! 2. The first rule of `routes` that matches the request decides: its runtime is selected when
//!    it is a healthy candidate under its cap; otherwise the creation is rejected, naming the
//!    rule.
//! 3. Otherwise the healthy candidate under its cap with the fewest sandboxes is selected (ties:
//!    the host's candidate order). If there is none, the creation is rejected, saying why.
//!
//! Configuration (every key optional):
//!
//! ```toml
//! [[plugin]]
//! name = "policy"
//! kind = "policy"
//! file = "target/plugins/default-policy.wasm"
//! [plugin.config]
//! # "<matcher> [&& <matcher>...] => <runtime>", first match wins;
//! # matchers: label:<key>=<glob>, image:<glob>
//! routes = ["label:tier=gpu => kata", "image:python:* && label:team=ml => gvisor"]
//! # a runtime running N or more sandboxes is not used (quote the key: it has a dot)
//! "cap.docker" = 100
//! "cap.kata" = 10
//! ```

use opensandbox_plugin_sdk::{
    config, export_policy, glob, log, Caller, CreateRequest, Policy, RuntimeCandidate,
    RuntimeDecision,
};

/// The prefix of the cap keys, `cap.<runtime>`.
const CAP: &str = "cap.";

/// One condition of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// The label `key` is set and its value matches the glob.
    Label { key: String, value: String },
    /// The image matches the glob.
    Image(String),
}

impl Matcher {
    fn matches(&self, request: &CreateRequest) -> bool {
        match self {
            Matcher::Label { key, value } => request
                .label(key)
                .is_some_and(|actual| glob::matches(value, actual)),
            Matcher::Image(pattern) => glob::matches(pattern, &request.image),
        }
    }
}

/// A rule of `routes`: when every matcher matches, use `runtime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The rule as written, for messages.
    pub text: String,
    pub matchers: Vec<Matcher>,
    pub runtime: String,
}

/// The parsed configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub routes: Vec<Route>,
    /// `(runtime, cap)`.
    pub caps: Vec<(String, u32)>,
}

/// Parses one rule of `routes`.
pub fn parse_route(text: &str) -> Result<Route, String> {
    let (conditions, runtime) = text.split_once("=>").ok_or_else(|| {
        format!("rule {text:?} has no \"=>\" (expected \"<matcher> => <runtime>\")")
    })?;
    let runtime = runtime.trim();
    if runtime.is_empty() {
        return Err(format!("rule {text:?} names no runtime after \"=>\""));
    }
    let mut matchers = Vec::new();
    for condition in conditions.split("&&") {
        let condition = condition.trim();
        let matcher = if let Some(rest) = condition.strip_prefix("label:") {
            let (key, value) = rest.split_once('=').ok_or_else(|| {
                format!("rule {text:?}: {condition:?} should be label:<key>=<glob>")
            })?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!(
                    "rule {text:?}: {condition:?} has an empty label key"
                ));
            }
            Matcher::Label {
                key: key.to_string(),
                value: value.trim().to_string(),
            }
        } else if let Some(pattern) = condition.strip_prefix("image:") {
            Matcher::Image(pattern.trim().to_string())
        } else {
            return Err(format!(
                "rule {text:?}: {condition:?} is not a matcher (label:<key>=<glob> or image:<glob>)"
            ));
        };
        matchers.push(matcher);
    }
    Ok(Route {
        text: text.trim().to_string(),
        matchers,
        runtime: runtime.to_string(),
    })
}

/// Reads and checks the configuration.
pub fn settings() -> Result<Settings, String> {
    let mut caps: Vec<(String, u32)> = Vec::new();
    for (key, _) in config::entries() {
        if key == "routes" {
            continue;
        }
        let Some(runtime) = key.strip_prefix(CAP) else {
            return Err(format!(
                "unknown key {key:?} (known keys: routes, \"cap.<runtime>\")"
            ));
        };
        if runtime.is_empty() {
            return Err(format!("{key}: names no runtime (\"cap.<runtime>\")"));
        }
        let cap = config::parse::<u32>(&key)?.unwrap_or_default();
        caps.push((runtime.to_string(), cap));
    }
    let routes = config::list("routes")
        .iter()
        .map(|r| parse_route(r).map_err(|e| format!("routes: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Settings { routes, caps })
}

impl Settings {
    fn cap(&self, runtime: &str) -> Option<u32> {
        self.caps
            .iter()
            .find(|(r, _)| r == runtime)
            .map(|(_, c)| *c)
    }

    /// Why `runtime` cannot take the sandbox, or `None` when it can.
    fn unusable(&self, runtime: &str, candidates: &[RuntimeCandidate]) -> Option<String> {
        let Some(candidate) = candidates.iter().find(|c| c.name == runtime) else {
            return Some(format!("runtime {runtime:?} is not available here"));
        };
        if !candidate.healthy {
            return Some(format!("runtime {runtime:?} is unhealthy"));
        }
        match self.cap(runtime) {
            Some(cap) if candidate.sandboxes >= cap => Some(format!(
                "runtime {runtime:?} is at its cap of {cap} sandboxes"
            )),
            _ => None,
        }
    }

    /// The decision for `request` among `candidates`.
    pub fn decide(
        &self,
        request: &CreateRequest,
        candidates: &[RuntimeCandidate],
    ) -> RuntimeDecision {
        if let Some(runtime) = &request.requested_runtime {
            return match self.unusable(runtime, candidates) {
                None => RuntimeDecision::Select(runtime.clone()),
                Some(why) => RuntimeDecision::Reject(format!("requested {why}")),
            };
        }
        if let Some(route) = self
            .routes
            .iter()
            .find(|r| r.matchers.iter().all(|m| m.matches(request)))
        {
            return match self.unusable(&route.runtime, candidates) {
                None => RuntimeDecision::Select(route.runtime.clone()),
                Some(why) => {
                    RuntimeDecision::Reject(format!("route {:?} applies, but {why}", route.text))
                }
            };
        }
        let mut best: Option<&RuntimeCandidate> = None;
        for c in candidates {
            if self.unusable(&c.name, candidates).is_none()
                && best.is_none_or(|b| c.sandboxes < b.sandboxes)
            {
                best = Some(c);
            }
        }
        match best {
            Some(c) => RuntimeDecision::Select(c.name.clone()),
            None if candidates.is_empty() => {
                RuntimeDecision::Reject("no runtime is available".to_string())
            }
            None => RuntimeDecision::Reject(format!(
                "no runtime can take the sandbox: {}",
                candidates
                    .iter()
                    .filter_map(|c| self.unusable(&c.name, candidates))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }
}

struct DefaultPolicy;

impl Policy for DefaultPolicy {
    fn validate_config() -> Result<(), String> {
        settings().map(|_| ())
    }

    fn select_runtime(
        request: &CreateRequest,
        _caller: &Caller,
        candidates: &[RuntimeCandidate],
    ) -> RuntimeDecision {
        match settings() {
            Ok(settings) => settings.decide(request, candidates),
            Err(e) => {
                // validate-config refused this at start-up; keep the host's default.
                log::error!("invalid configuration: {e}");
                RuntimeDecision::Abstain
            }
        }
    }
}

export_policy!(DefaultPolicy);

#[cfg(test)]
mod tests {
    use super::*;
    use opensandbox_plugin_sdk::testing;

    fn candidate(name: &str, healthy: bool, sandboxes: u32) -> RuntimeCandidate {
        RuntimeCandidate {
            name: name.to_string(),
            healthy,
            sandboxes,
        }
    }

    fn request(image: &str, labels: &[(&str, &str)], runtime: Option<&str>) -> CreateRequest {
        CreateRequest {
            name: "sb".to_string(),
            image: image.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            requested_runtime: runtime.map(str::to_string),
            is_fork: false,
        }
    }

    fn select(
        config: &[(&str, &str)],
        req: &CreateRequest,
        c: &[RuntimeCandidate],
    ) -> RuntimeDecision {
        testing::set_config(config.iter().copied());
        DefaultPolicy::validate_config().expect("valid config");
        DefaultPolicy::select_runtime(req, &Caller::default(), c)
    }

    fn sel(name: &str) -> RuntimeDecision {
        RuntimeDecision::Select(name.to_string())
    }

    fn rejected(d: RuntimeDecision) -> String {
        match d {
            RuntimeDecision::Reject(reason) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn least_loaded_healthy_wins_ties_by_order() {
        let c = [
            candidate("docker", true, 5),
            candidate("kata", false, 0),
            candidate("gvisor", true, 2),
            candidate("runsc", true, 2),
        ];
        assert_eq!(
            select(&[], &request("alpine", &[], None), &c),
            sel("gvisor")
        );
    }

    #[test]
    fn requested_runtime_is_honoured_or_rejected() {
        let c = [candidate("docker", true, 5), candidate("kata", false, 0)];
        let caps = [("cap.docker", "5")];
        assert_eq!(
            select(&[], &request("a", &[], Some("docker")), &c),
            sel("docker")
        );
        let why = rejected(select(&caps, &request("a", &[], Some("docker")), &c));
        assert!(why.contains("cap of 5"), "{why}");
        let why = rejected(select(&[], &request("a", &[], Some("kata")), &c));
        assert!(why.contains("unhealthy"), "{why}");
        let why = rejected(select(&[], &request("a", &[], Some("nope")), &c));
        assert!(why.contains("\"nope\" is not available"), "{why}");
    }

    #[test]
    fn routes_by_label_and_image() {
        let c = [
            candidate("docker", true, 0),
            candidate("kata", true, 9),
            candidate("gvisor", true, 7),
        ];
        let cfg = [(
            "routes",
            "label:tier=gpu* => kata\nimage:python:* && label:team=ml => gvisor",
        )];
        assert_eq!(
            select(&cfg, &request("alpine", &[("tier", "gpu-large")], None), &c),
            sel("kata")
        );
        assert_eq!(
            select(&cfg, &request("python:3.12", &[("team", "ml")], None), &c),
            sel("gvisor")
        );
        // Only one of the two conditions: falls through to the least loaded.
        assert_eq!(
            select(&cfg, &request("python:3.12", &[("team", "web")], None), &c),
            sel("docker")
        );
        assert_eq!(
            select(&cfg, &request("alpine", &[("tier", "cpu")], None), &c),
            sel("docker")
        );
    }

    #[test]
    fn a_route_to_an_unusable_runtime_rejects() {
        let c = [candidate("docker", true, 0), candidate("kata", true, 3)];
        let cfg = [("routes", "image:gpu/* => kata"), ("cap.kata", "3")];
        let why = rejected(select(&cfg, &request("gpu/cuda", &[], None), &c));
        assert!(
            why.contains("route \"image:gpu/* => kata\"") && why.contains("cap of 3"),
            "{why}"
        );
        let cfg = [("routes", "image:gpu/* => firecracker")];
        let why = rejected(select(&cfg, &request("gpu/cuda", &[], None), &c));
        assert!(why.contains("\"firecracker\" is not available"), "{why}");
    }

    #[test]
    fn caps_skip_full_runtimes() {
        let c = [candidate("docker", true, 1), candidate("kata", true, 4)];
        let cfg = [("cap.docker", "1"), ("cap.kata", "10")];
        assert_eq!(select(&cfg, &request("a", &[], None), &c), sel("kata"));
        let cfg = [("cap.docker", "1"), ("cap.kata", "4")];
        let why = rejected(select(&cfg, &request("a", &[], None), &c));
        assert!(
            why.contains("\"docker\" is at its cap of 1")
                && why.contains("\"kata\" is at its cap of 4"),
            "{why}"
        );
    }

    #[test]
    fn nothing_usable_rejects() {
        assert_eq!(
            rejected(select(&[], &request("a", &[], None), &[])),
            "no runtime is available"
        );
        let why = rejected(select(
            &[],
            &request("a", &[], None),
            &[candidate("docker", false, 0)],
        ));
        assert!(why.contains("\"docker\" is unhealthy"), "{why}");
    }

    #[test]
    fn validate_config_names_the_key() {
        let check = |cfg: &[(&str, &str)]| {
            testing::set_config(cfg.iter().copied());
            DefaultPolicy::validate_config()
        };
        assert_eq!(check(&[]), Ok(()));
        assert!(check(&[("route", "x")])
            .unwrap_err()
            .contains("unknown key \"route\""));
        assert!(check(&[("routes", "image:* kata")])
            .unwrap_err()
            .starts_with("routes: "));
        assert!(check(&[("routes", "image:* =>")])
            .unwrap_err()
            .starts_with("routes: "));
        assert!(check(&[("routes", "tag:x => kata")])
            .unwrap_err()
            .starts_with("routes: "));
        assert!(check(&[("routes", "label:=x => kata")])
            .unwrap_err()
            .starts_with("routes: "));
        assert!(check(&[("cap.docker", "many")])
            .unwrap_err()
            .starts_with("cap.docker: "));
        assert!(check(&[("cap.docker", "-1")])
            .unwrap_err()
            .starts_with("cap.docker: "));
        assert!(check(&[("cap.", "1")]).unwrap_err().starts_with("cap.: "));
        assert!(check(&[("caps", "docker=1")])
            .unwrap_err()
            .contains("unknown key \"caps\""));
        assert_eq!(
            check(&[("cap.docker", "0"), ("routes", "image:* => docker")]),
            Ok(())
        );
    }

    #[test]
    fn parses_rules() {
        assert_eq!(
            parse_route(" label:tier = gpu && image:x* =>  kata ").unwrap(),
            Route {
                text: "label:tier = gpu && image:x* =>  kata".to_string(),
                matchers: vec![
                    Matcher::Label {
                        key: "tier".to_string(),
                        value: "gpu".to_string()
                    },
                    Matcher::Image("x*".to_string()),
                ],
                runtime: "kata".to_string(),
            }
        );
    }
}
