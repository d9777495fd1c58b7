//! `command-guard`: a command hook that denies, allows and rewrites commands by glob patterns.
//!
//! Patterns are matched against the whole command line (surrounding whitespace ignored), `*`
//! matching any run of characters and `?` one character (see `opensandbox_plugin_sdk::glob`).
//! For each command, in this order:
//!
//! 1. `deny`: the first pattern that matches denies the command; the reason names the pattern
//!    (prefixed by `deny_reason` when set).
//! 2. `allow`: when set, a command that matches none of its patterns is denied.
//! 3. `rewrite`: the first rule `"<glob> => <replacement>"` that matches replaces the command
//!    line (the environment is kept). In the replacement, `{}` stands for the text matched by
//!    the pattern's first wildcard (the whole command when the pattern has none, and with the
//!    pattern `*` that is the whole command too), `{0}` for the whole original command, and
//!    `{1}`, `{2}`, ... for the text matched by the pattern's 1st, 2nd, ... wildcard (`*` or
//!    `?`). So `"pip install * => pip install --no-index {}"` turns `pip install numpy` into
//!    `pip install --no-index numpy`. The rewritten command is not checked again.
//!
//! This is a guard rail against mistakes, not a security boundary: the shell runs the command
//! line, so `sh -c '...'`, `;` or variables can always spell a denied command differently.
//!
//! ```toml
//! [plugins.config]
//! deny = ["rm -rf /*", "*shutdown*", "curl * | sh"]
//! allow = ["ls*", "cat *", "pip *", "python*"]
//! deny_reason = "blocked by policy"
//! rewrite = ["pip install * => pip install --no-index {}", "npm * => npm --offline {1}"]
//! ```

use opensandbox_plugin_sdk::{
    config, export_hook, glob, log, Caller, Command, CommandDecision, CommandRewrite, Hook,
};

/// The configuration keys this plugin knows.
const KEYS: &[&str] = &["deny", "allow", "deny_reason", "rewrite"];

/// A rule of `rewrite`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub pattern: String,
    pub replacement: String,
}

/// The parsed configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub deny: Vec<String>,
    pub allow: Vec<String>,
    pub deny_reason: Option<String>,
    pub rewrite: Vec<Rewrite>,
}

/// The number of wildcards (`*`, `?`) in a pattern.
fn wildcards(pattern: &str) -> usize {
    pattern.chars().filter(|c| matches!(c, '*' | '?')).count()
}

/// Parses one rule of `rewrite`.
pub fn parse_rewrite(text: &str) -> Result<Rewrite, String> {
    let (pattern, replacement) = text.split_once("=>").ok_or_else(|| {
        format!("rule {text:?} has no \"=>\" (expected \"<glob> => <replacement>\")")
    })?;
    let pattern = pattern.trim();
    let replacement = replacement.trim();
    if pattern.is_empty() {
        return Err(format!("rule {text:?} has an empty pattern"));
    }
    if replacement.is_empty() {
        return Err(format!("rule {text:?} has an empty replacement"));
    }
    // Every {n} must name a wildcard of the pattern.
    let mut rest = replacement;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let inside = &after[..close];
        if !inside.is_empty() && inside.chars().all(|c| c.is_ascii_digit()) {
            let n: usize = inside
                .parse()
                .map_err(|_| format!("rule {text:?}: {{{inside}}} is too large"))?;
            if n > wildcards(pattern) {
                return Err(format!(
                    "rule {text:?}: {{{n}}} names no wildcard (the pattern has {})",
                    wildcards(pattern)
                ));
            }
        }
        rest = &after[close + 1..];
    }
    Ok(Rewrite {
        pattern: pattern.to_string(),
        replacement: replacement.to_string(),
    })
}

/// Fills a replacement: `{}` is the first capture (`original` if there is none), `{0}` is
/// `original`, `{n}` the n-th capture; anything else is kept as written.
pub fn fill(replacement: &str, original: &str, captures: &[String]) -> String {
    let mut out = String::new();
    let mut rest = replacement;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}');
        let inside = close.map(|c| &after[..c]);
        match inside {
            Some("") => out.push_str(captures.first().map_or(original, String::as_str)),
            Some("0") => out.push_str(original),
            Some(n) if n.chars().all(|c| c.is_ascii_digit()) => {
                match n
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| captures.get(n.wrapping_sub(1)))
                {
                    Some(capture) => out.push_str(capture),
                    None => {
                        out.push('{');
                        out.push_str(n);
                        out.push('}');
                    }
                }
            }
            _ => {
                out.push('{');
                rest = after;
                continue;
            }
        }
        rest = &after[close.unwrap_or(0) + 1..];
    }
    out.push_str(rest);
    out
}

/// Reads and checks the configuration.
pub fn rules() -> Result<Rules, String> {
    if let Some((key, _)) = config::entries()
        .into_iter()
        .find(|(key, _)| !KEYS.contains(&key.as_str()))
    {
        return Err(format!(
            "unknown key {key:?} (known keys: {})",
            KEYS.join(", ")
        ));
    }
    let patterns = |key: &str| -> Result<Vec<String>, String> {
        let list = config::list(key);
        match list.iter().find(|p| p.trim().is_empty()) {
            Some(_) => Err(format!("{key}: empty pattern")),
            None => Ok(list.into_iter().map(|p| p.trim().to_string()).collect()),
        }
    };
    let rewrite = config::list("rewrite")
        .iter()
        .map(|r| parse_rewrite(r).map_err(|e| format!("rewrite: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rules {
        deny: patterns("deny")?,
        allow: patterns("allow")?,
        deny_reason: config::get("deny_reason").filter(|r| !r.trim().is_empty()),
        rewrite,
    })
}

impl Rules {
    /// The decision for `command`.
    pub fn decide(&self, command: &Command) -> CommandDecision {
        let line = command.command.trim();
        let deny = |why: String| {
            CommandDecision::Deny(match &self.deny_reason {
                Some(prefix) => format!("{prefix}: {why}"),
                None => why,
            })
        };
        if let Some(pattern) = self.deny.iter().find(|p| glob::matches(p, line)) {
            return deny(format!("command matches denied pattern {pattern:?}"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|p| glob::matches(p, line)) {
            return deny("command matches no allowed pattern".to_string());
        }
        for rule in &self.rewrite {
            if let Some(captures) = glob::captures(&rule.pattern, line) {
                return CommandDecision::Rewrite(CommandRewrite {
                    command: fill(&rule.replacement, &command.command, &captures),
                    env: command.env.clone(),
                });
            }
        }
        CommandDecision::Allow
    }
}

struct CommandGuard;

impl Hook for CommandGuard {
    fn validate_config() -> Result<(), String> {
        rules().map(|_| ())
    }

    fn before_command(command: &Command, _caller: &Caller) -> CommandDecision {
        match rules() {
            Ok(rules) => rules.decide(command),
            Err(e) => {
                // validate-config refused this at start-up; fail closed.
                log::error!("invalid configuration: {e}");
                CommandDecision::Deny(format!("command-guard is misconfigured: {e}"))
            }
        }
    }
}

export_hook!(CommandGuard);

#[cfg(test)]
mod tests {
    use super::*;
    use opensandbox_plugin_sdk::testing;

    fn decide(config: &[(&str, &str)], line: &str) -> CommandDecision {
        testing::set_config(config.iter().copied());
        CommandGuard::validate_config().expect("valid config");
        let command = Command {
            sandbox: "sb".to_string(),
            command: line.to_string(),
            env: vec![("A".to_string(), "1".to_string())],
            ..Command::default()
        };
        CommandGuard::before_command(&command, &Caller::default())
    }

    fn rewritten(line: &str) -> CommandDecision {
        CommandDecision::Rewrite(CommandRewrite {
            command: line.to_string(),
            env: vec![("A".to_string(), "1".to_string())],
        })
    }

    fn denied(reason: &str) -> CommandDecision {
        CommandDecision::Deny(reason.to_string())
    }

    #[test]
    fn no_rules_allow_everything() {
        assert_eq!(decide(&[], "rm -rf /"), CommandDecision::Allow);
    }

    #[test]
    fn deny_names_the_pattern_and_takes_precedence() {
        let cfg = [
            ("deny", "rm -rf /*\n*shutdown*"),
            ("allow", "rm *\nsudo *"),
            ("rewrite", "sudo * => {1}"),
        ];
        assert_eq!(
            decide(&cfg, "  rm -rf /home "),
            denied("command matches denied pattern \"rm -rf /*\"")
        );
        assert_eq!(
            decide(&cfg, "sudo shutdown -h now"),
            denied("command matches denied pattern \"*shutdown*\"")
        );
        assert_eq!(decide(&cfg, "rm -rf tmp"), CommandDecision::Allow);
        assert_eq!(decide(&cfg, "sudo ls"), rewritten("ls"));
        assert_eq!(
            decide(&cfg, "ls"),
            denied("command matches no allowed pattern")
        );
    }

    #[test]
    fn deny_reason_prefixes() {
        let cfg = [("deny", "curl *"), ("deny_reason", "no network tools")];
        assert_eq!(
            decide(&cfg, "curl example.com"),
            denied("no network tools: command matches denied pattern \"curl *\"")
        );
        let cfg = [("allow", "ls"), ("deny_reason", "read-only sandbox")];
        assert_eq!(
            decide(&cfg, "touch x"),
            denied("read-only sandbox: command matches no allowed pattern")
        );
    }

    #[test]
    fn first_matching_rewrite_wins() {
        let cfg = [(
            "rewrite",
            "pip install * => pip install --no-index {}\npip * => echo {0}\napt-get ? * => [{0}] {2}{1}\n* => echo rewritten: {}",
        )];
        assert_eq!(
            decide(&cfg, "pip install numpy"),
            rewritten("pip install --no-index numpy")
        );
        assert_eq!(decide(&cfg, "pip list"), rewritten("echo pip list"));
        assert_eq!(
            decide(&cfg, "apt-get x y z"),
            rewritten("[apt-get x y z] y zx")
        );
        assert_eq!(decide(&cfg, "python"), rewritten("echo rewritten: python"));
    }

    #[test]
    fn fill_keeps_other_braces() {
        let caps = vec!["a".to_string()];
        assert_eq!(fill("x{}y", "CMD", &caps), "xay");
        assert_eq!(fill("x{}y", "CMD", &[]), "xCMDy");
        assert_eq!(fill("x{0}y", "CMD", &caps), "xCMDy");
        assert_eq!(fill("{1}{1}", "CMD", &caps), "aa");
        assert_eq!(fill("${HOME} {x} {", "CMD", &caps), "${HOME} {x} {");
        assert_eq!(fill("{2}", "CMD", &caps), "{2}");
    }

    #[test]
    fn validate_config_names_the_key() {
        let check = |cfg: &[(&str, &str)]| {
            testing::set_config(cfg.iter().copied());
            CommandGuard::validate_config()
        };
        assert_eq!(check(&[("deny", "a\nb"), ("deny_reason", "x")]), Ok(()));
        assert!(check(&[("denied", "x")])
            .unwrap_err()
            .contains("unknown key \"denied\""));
        assert!(check(&[("deny", "a\n")]).unwrap_err().starts_with("deny: "));
        assert!(check(&[("allow", " ")]).unwrap_err().starts_with("allow: "));
        assert!(check(&[("rewrite", "ls")])
            .unwrap_err()
            .starts_with("rewrite: "));
        assert!(check(&[("rewrite", " => x")])
            .unwrap_err()
            .starts_with("rewrite: "));
        assert!(check(&[("rewrite", "ls =>")])
            .unwrap_err()
            .starts_with("rewrite: "));
        assert!(check(&[("rewrite", "ls * => {2}")])
            .unwrap_err()
            .starts_with("rewrite: "));
        assert!(check(&[("rewrite", "ls => {1}")])
            .unwrap_err()
            .starts_with("rewrite: "));
        assert_eq!(check(&[("rewrite", "ls * => {1} {} ${X}")]), Ok(()));
        assert_eq!(check(&[("rewrite", "ls => {0} {}")]), Ok(()));
    }
}
