//! The configuration file (`--config`, TOML): its settings mapped onto the flags' environment
//! variables, and `eps config`, which prints one that `--config` accepts unchanged.

use std::collections::BTreeSet;
use std::path::Path;

use clap::parser::ValueSource;
use clap::CommandFactory;

use crate::error::ConfigError;

/// One setting of a configuration file: (table, or `None` for the top level; key; value).
type Entry<'a> = (Option<&'a str>, &'a str, &'a toml::Value);
use crate::cli::Cli;

/// Commands whose settings `eps config` shows.
const COMMANDS: &[&str] = &["server", "process", "client", "status", "compact"];
/// Settings whose values are never printed.
const SECRETS: &[&str] = &["token", "database_url"];

/// The TOML configuration file: keys are flag names, at the top level (for every command that has that
/// flag) or in a `[server]`, `[process]`, `[client]`, `[status]` or `[compact]` table (for that command
/// only, and winning over the top level).
///
/// It is applied by exposing each setting of the command being run as the environment variable of the
/// flag it names, unless that variable is already set. Precedence is therefore flag, then environment,
/// then file, then default — clap applies the first three in that order by itself. Several commands
/// share a variable (`EPS_TOKEN` is the server's and the client's), which is why a file is applied for
/// one command at a time.
pub struct FileConfig {
    path: std::path::PathBuf,
    table: toml::Table,
}

impl FileConfig {
    /// Reads and checks the file: every key must name a flag of a command that has it.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read the configuration file {}: {e}", path.display())))?;
        let table: toml::Table =
            text.parse().map_err(|e| ConfigError(format!("{} is not valid TOML: {e}", path.display())))?;
        let file = FileConfig { path: path.to_path_buf(), table };
        for (scope, key, value) in file.entries()? {
            let scopes: Vec<&str> = scope.map_or_else(|| COMMANDS.to_vec(), |s| vec![s]);
            if !scopes.iter().any(|command| env_of(command, key).is_some()) {
                return Err(ConfigError(format!(
                    "unknown setting {}{key:?} in {}: use a flag name of that command",
                    scope.map(|s| format!("[{s}] ")).unwrap_or_default(),
                    path.display()
                )));
            }
            scalar(key, value, &file.path)?;
        }
        Ok(file)
    }

    /// (table, key, value) for every setting; `None` for the top level.
    fn entries(&self) -> Result<Vec<Entry<'_>>, ConfigError> {
        let mut out = Vec::new();
        for (key, value) in &self.table {
            match value {
                toml::Value::Table(inner) => {
                    let Some(scope) = COMMANDS.iter().copied().find(|c| *c == key) else {
                        return Err(ConfigError(format!("unknown table [{key}] in {}", self.path.display())));
                    };
                    out.extend(inner.iter().map(|(k, v)| (Some(scope), k.as_str(), v)));
                }
                _ => out.push((None, key.as_str(), value)),
            }
        }
        Ok(out)
    }

    /// Sets the environment variables of `command`'s settings that are not set yet; returns them.
    /// Call only while no other thread runs (before the runtime starts).
    pub fn apply(&self, command: &str) -> Result<BTreeSet<String>, ConfigError> {
        let mut applied = BTreeSet::new();
        let entries = self.entries()?;
        // The command's own table first: it wins over the top level.
        let ordered =
            entries.iter().filter(|(s, ..)| *s == Some(command)).chain(entries.iter().filter(|(s, ..)| s.is_none()));
        for (_, key, value) in ordered {
            let Some(env) = env_of(command, key) else { continue };
            if std::env::var_os(&env).is_none() && !applied.contains(&env) {
                std::env::set_var(&env, scalar(key, value, &self.path)?);
                applied.insert(env);
            }
        }
        Ok(applied)
    }

    /// Undoes [`FileConfig::apply`].
    pub fn unapply(applied: &BTreeSet<String>) {
        for env in applied {
            std::env::remove_var(env);
        }
    }
}

/// The environment variable of `command`'s flag named `key` (its long name or its id).
fn env_of(command: &str, key: &str) -> Option<String> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(command)?;
    let arg = sub.get_arguments().find(|a| a.get_long() == Some(key) || a.get_id() == key)?;
    arg.get_env().and_then(|e| e.to_str()).map(str::to_string)
}

fn scalar(key: &str, value: &toml::Value, path: &Path) -> Result<String, ConfigError> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(ConfigError(format!("setting {key:?} in {}: {other} is not a plain value", path.display()))),
    }
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

/// Every setting of every command with its effective value and where it came from, secrets redacted,
/// as a configuration file `--config` accepts unchanged (secrets and unset settings are comments).
/// Call only while no other thread runs (it applies the file for each command in turn).
pub fn describe(file: Option<&FileConfig>) -> Result<String, ConfigError> {
    let mut out = String::new();
    for name in COMMANDS {
        let from_file = match file {
            Some(file) => file.apply(name)?,
            None => BTreeSet::new(),
        };
        let matches = Cli::command().try_get_matches_from(["eps", name]);
        FileConfig::unapply(&from_file);
        let matches =
            matches.map_err(|e| ConfigError(format!("the configuration is not valid for eps {name}: {e}")))?;
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
            let key = arg.get_long().unwrap_or(id);
            // The output is a file `--config` takes unchanged: a secret and an unset setting are
            // comments (a value of "<redacted>" or "" would be applied as one), the rest TOML strings.
            match sub.get_raw(id) {
                Some(_) if SECRETS.contains(&id) => {
                    out.push_str(&format!("# {key} = <redacted>  # {source}; set it here or in {env}\n"))
                }
                // An unset switch is a comment too: clap counts a switch given by its variable as
                // present even when false, and two such switches may conflict (--from-start, --new-run).
                Some(_) if matches!(arg.get_action(), clap::ArgAction::SetTrue) && !sub.get_flag(id) => {
                    out.push_str(&format!("# {key} = false  # {source}\n"))
                }
                Some(values) => {
                    let value = values.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(",");
                    out.push_str(&format!("{key} = {}  # {source}\n", toml::Value::String(value)));
                }
                None => out.push_str(&format!("# {key} =  # {source}\n")),
            }
        }
        out.push('\n');
    }
    Ok(out)
}
