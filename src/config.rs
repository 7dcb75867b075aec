//! Configuration errors: settings eps refuses to start with. They exit with code 2 (usage error) at
//! once, before anything is served or retried, because waiting cannot fix them.

/// A configuration eps refuses to run with (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

use std::collections::BTreeSet;
use std::path::Path;

use clap::parser::ValueSource;
use clap::CommandFactory;

use crate::cli::Cli;

/// Commands whose settings `eps config` shows.
const COMMANDS: &[&str] = &["server", "process", "client", "status", "compact"];
/// Settings whose values are never printed.
const SECRETS: &[&str] = &["token", "database_url"];

/// Reads the TOML configuration file and exposes each of its settings as the environment variable of
/// the flag it names, unless that variable is already set. Precedence is therefore: flag, then
/// environment, then file, then default — clap applies the first three in that order by itself.
///
/// Keys are flag names (`listen`, `data-dir`, `token`...), at the top level (for every command that has
/// that flag) or in a `[server]`, `[process]`, `[client]`, `[status]` or `[compact]` table. Returns the
/// variables the file set, so `eps config` can say where each value came from.
pub fn apply_file(path: &Path) -> Result<BTreeSet<String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read the configuration file {}: {e}", path.display())))?;
    let table: toml::Table =
        text.parse().map_err(|e| ConfigError(format!("{} is not valid TOML: {e}", path.display())))?;
    let command = Cli::command();
    let mut applied = BTreeSet::new();
    let mut set = |scope: Option<&str>, key: &str, value: &toml::Value| -> Result<(), ConfigError> {
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(ConfigError(format!("setting {key:?} in {}: {other} is not a plain value", path.display()))),
        };
        let mut found = false;
        for sub in command.get_subcommands().filter(|s| scope.is_none_or(|name| s.get_name() == name)) {
            for arg in sub.get_arguments().filter(|a| a.get_long() == Some(key) || a.get_id() == key) {
                let Some(env) = arg.get_env().and_then(|e| e.to_str()) else { continue };
                found = true;
                if std::env::var_os(env).is_none() && !applied.contains(env) {
                    // Single-threaded here: main calls this before starting the runtime.
                    std::env::set_var(env, &value);
                    applied.insert(env.to_string());
                }
            }
        }
        if found {
            Ok(())
        } else {
            Err(ConfigError(format!(
                "unknown setting {}{key:?} in {}: use a flag name of that command",
                scope.map(|s| format!("[{s}] ")).unwrap_or_default(),
                path.display()
            )))
        }
    };
    // Command tables first: a setting in [server] is more specific than the same key at the top.
    for (key, value) in &table {
        if let toml::Value::Table(inner) = value {
            if !COMMANDS.contains(&key.as_str()) {
                return Err(ConfigError(format!("unknown table [{key}] in {}", path.display())));
            }
            for (k, v) in inner {
                set(Some(key), k, v)?;
            }
        }
    }
    for (key, value) in &table {
        if !matches!(value, toml::Value::Table(_)) {
            set(None, key, value)?;
        }
    }
    Ok(applied)
}

/// The configuration path given by `--config PATH`, `--config=PATH` or `EPS_CONFIG`, read before clap
/// parses anything (the file feeds clap's environment defaults).
pub fn config_path_from_args(args: &[std::ffi::OsString]) -> Option<std::path::PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(std::path::PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.into());
        }
    }
    std::env::var_os("EPS_CONFIG").map(std::path::PathBuf::from)
}

/// Every setting of every command with its effective value and where it came from, secrets redacted.
pub fn describe(from_file: &BTreeSet<String>) -> Result<String, ConfigError> {
    let mut out = String::new();
    for name in COMMANDS {
        let matches = Cli::command()
            .try_get_matches_from(["eps", name])
            .map_err(|e| ConfigError(format!("the configuration is not valid for eps {name}: {e}")))?;
        let (_, sub) = matches.subcommand().expect("a subcommand was given");
        let command = Cli::command();
        let sub_command = command.find_subcommand(name).expect("known subcommand");
        out.push_str(&format!("[{name}]\n"));
        for arg in sub_command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version" | "log_format" | "log_level" | "config") {
                continue;
            }
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            let source = match sub.value_source(id) {
                Some(ValueSource::EnvVariable) if from_file.contains(env) => "file".to_string(),
                Some(ValueSource::EnvVariable) => format!("env {env}"),
                Some(ValueSource::CommandLine) => "flag".to_string(),
                Some(ValueSource::DefaultValue) => "default".to_string(),
                _ => "unset".to_string(),
            };
            let value = match sub.get_raw(id) {
                _ if SECRETS.contains(&id) && sub.contains_id(id) && sub.get_raw(id).is_some() => "<redacted>".to_string(),
                Some(values) => values.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(","),
                None => String::new(),
            };
            let key = arg.get_long().unwrap_or(id);
            out.push_str(&format!("{key} = {value:?}  # {source}\n"));
        }
        out.push('\n');
    }
    Ok(out)
}
