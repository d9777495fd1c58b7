//! `audit`: a command hook that writes one host log line per command that ran.
//!
//! The line (at the configured `level`) is
//!
//! ```text
//! command sandbox=<name> sandbox_id=<uuid> key_id=<uuid> exit=<code|timeout> duration_ms=<n> stdout_bytes=<n> stderr_bytes=<n> command="<command line, escaped>"
//! ```
//!
//! `before-command` allows every command; with `log_requests = true` it also logs
//! `command requested sandbox=... key_id=... command="..."` at debug level.
//!
//! ```toml
//! [plugins.config]
//! level = "info"          # info | warn | debug; default info
//! log_requests = false    # default false
//! ```

use opensandbox_plugin_sdk::{
    config, export_hook,
    log::{self, Level},
    Caller, Command, CommandDecision, CommandOutcome, Hook,
};

/// The configuration keys this plugin knows.
const KEYS: &[&str] = &["level", "log_requests"];

/// The parsed configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub level: Level,
    pub log_requests: bool,
}

/// Reads and checks the configuration.
pub fn settings() -> Result<Settings, String> {
    if let Some((key, _)) = config::entries()
        .into_iter()
        .find(|(key, _)| !KEYS.contains(&key.as_str()))
    {
        return Err(format!(
            "unknown key {key:?} (known keys: {})",
            KEYS.join(", ")
        ));
    }
    let level = match config::get("level").as_deref().map(str::trim) {
        None | Some("info") => Level::Info,
        Some("warn") => Level::Warn,
        Some("debug") => Level::Debug,
        Some(other) => {
            return Err(format!(
                "level: invalid value {other:?} (expected info, warn or debug)"
            ))
        }
    };
    let log_requests = config::parse::<bool>("log_requests")?.unwrap_or(false);
    Ok(Settings {
        level,
        log_requests,
    })
}

/// The audit line of a command that ran.
pub fn line(command: &Command, caller: &Caller, outcome: &CommandOutcome) -> String {
    let exit = match outcome.exit_code {
        Some(code) if !outcome.timed_out => code.to_string(),
        _ => "timeout".to_string(),
    };
    format!(
        "command sandbox={} sandbox_id={} key_id={} exit={} duration_ms={} stdout_bytes={} stderr_bytes={} command={:?}",
        command.sandbox,
        command.sandbox_id,
        caller.key_id,
        exit,
        outcome.duration_ms,
        outcome.stdout_bytes,
        outcome.stderr_bytes,
        command.command,
    )
}

struct Audit;

impl Hook for Audit {
    fn validate_config() -> Result<(), String> {
        settings().map(|_| ())
    }

    fn before_command(command: &Command, caller: &Caller) -> CommandDecision {
        if settings().is_ok_and(|s| s.log_requests) {
            log::debug!(
                "command requested sandbox={} key_id={} command={:?}",
                command.sandbox,
                caller.key_id,
                command.command
            );
        }
        CommandDecision::Allow
    }

    fn after_command(command: &Command, caller: &Caller, outcome: &CommandOutcome) {
        let level = settings().map(|s| s.level).unwrap_or(Level::Info);
        log::log(level, &line(command, caller, outcome));
    }
}

export_hook!(Audit);

#[cfg(test)]
mod tests {
    use super::*;
    use opensandbox_plugin_sdk::testing;

    fn command() -> Command {
        Command {
            sandbox: "web".to_string(),
            sandbox_id: "5f0c".to_string(),
            command: "echo \"hi\"\nls".to_string(),
            ..Command::default()
        }
    }

    fn caller() -> Caller {
        Caller {
            key_id: "k-1".to_string(),
            admin: false,
        }
    }

    #[test]
    fn logs_one_line_per_command() {
        testing::set_config([("level", "warn")]);
        Audit::validate_config().unwrap();
        let outcome = CommandOutcome {
            exit_code: Some(3),
            timed_out: false,
            duration_ms: 12,
            stdout_bytes: 5,
            stderr_bytes: 0,
        };
        Audit::after_command(&command(), &caller(), &outcome);
        assert_eq!(
            testing::take_logs(),
            vec![(
                Level::Warn,
                "command sandbox=web sandbox_id=5f0c key_id=k-1 exit=3 duration_ms=12 stdout_bytes=5 stderr_bytes=0 command=\"echo \\\"hi\\\"\\nls\"".to_string()
            )]
        );
    }

    #[test]
    fn timeouts_say_so() {
        testing::set_config::<&str, &str>([]);
        let outcome = CommandOutcome {
            exit_code: None,
            timed_out: true,
            duration_ms: 1000,
            ..CommandOutcome::default()
        };
        Audit::after_command(&command(), &caller(), &outcome);
        let logs = testing::take_logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].0, Level::Info);
        assert!(
            logs[0].1.contains(" exit=timeout duration_ms=1000 "),
            "{}",
            logs[0].1
        );
    }

    #[test]
    fn before_command_allows_and_optionally_logs() {
        testing::set_config::<&str, &str>([]);
        assert_eq!(
            Audit::before_command(&command(), &caller()),
            CommandDecision::Allow
        );
        assert!(testing::take_logs().is_empty());
        testing::set_config([("log_requests", "true"), ("level", "debug")]);
        assert_eq!(
            Audit::before_command(&command(), &caller()),
            CommandDecision::Allow
        );
        let logs = testing::take_logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].0, Level::Debug);
    }

    #[test]
    fn validate_config_names_the_key() {
        let check = |cfg: &[(&str, &str)]| {
            testing::set_config(cfg.iter().copied());
            Audit::validate_config()
        };
        assert_eq!(
            check(&[("level", "debug"), ("log_requests", "false")]),
            Ok(())
        );
        assert!(check(&[("level", "loud")])
            .unwrap_err()
            .starts_with("level: "));
        assert!(check(&[("log_requests", "yes")])
            .unwrap_err()
            .starts_with("log_requests: "));
        assert!(check(&[("verbose", "true")])
            .unwrap_err()
            .contains("unknown key \"verbose\""));
    }
}
