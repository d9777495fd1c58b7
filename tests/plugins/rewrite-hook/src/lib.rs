//! Test fixture: rewrites every command `X` into `echo rewritten: X` (environment kept).

use opensandbox_plugin_sdk::{export_hook, Caller, Command, CommandDecision, CommandRewrite, Hook};

struct Rewrite;

impl Hook for Rewrite {
    fn before_command(command: &Command, _caller: &Caller) -> CommandDecision {
        CommandDecision::Rewrite(CommandRewrite {
            command: format!("echo rewritten: {}", command.command),
            env: command.env.clone(),
        })
    }
}

export_hook!(Rewrite);
