//! `banger completion <shell>`, and the dynamic completion behind it.
//!
//! The printed script calls `banger` back on every <TAB> with `COMPLETE=<shell>`
//! in its environment (clap_complete's `CompleteEnv`); `main` answers those
//! calls before anything else. VM, image and kernel names come from the
//! running daemon, with a short timeout; without a daemon they complete to
//! nothing (no file-name fallback, and the daemon is never started for it).

use crate::connect;
use banger_api::Client;
use clap::{Arg, Args, Command, ValueEnum};
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use clap_complete::env::{Bash, EnvCompleter, Fish, Powershell, Zsh};
use std::ffi::OsStr;
use std::time::Duration;

/// The environment variable the scripts set to ask for completions.
pub const COMPLETE_VAR: &str = "COMPLETE";

/// How long a <TAB> waits for the daemon's lists.
const DAEMON_TIMEOUT: Duration = Duration::from_millis(500);

const LOADING: &str = "\
Loading the script:

  bash        this shell:    source <(banger completion bash)
              every shell:   banger completion bash > ~/.local/share/bash-completion/completions/banger
              system-wide:   banger completion bash | sudo tee /etc/bash_completion.d/banger
  zsh         banger completion zsh > ~/.zfunc/_banger
              with `fpath+=(~/.zfunc); autoload -Uz compinit; compinit` in ~/.zshrc
  fish        banger completion fish > ~/.config/fish/completions/banger.fish
  powershell  banger completion powershell | Out-String | Invoke-Expression
              (add that line to $PROFILE to keep it)

The script asks banger itself for candidates on every <TAB>: subcommands,
flags, and the names of VMs, images and kernels, read live from the running
daemon. When the daemon is not running, names complete to nothing.";

#[derive(Args)]
#[command(after_long_help = LOADING)]
pub struct CompletionArgs {
    /// The shell to print the completion script for.
    shell: Shell,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
    Powershell,
}

/// Prints the registration script of `a.shell`.
pub fn run(a: CompletionArgs) -> anyhow::Result<i32> {
    let completer = completer_path();
    let mut script = Vec::new();
    let shell: &dyn EnvCompleter = match a.shell {
        Shell::Bash => &Bash,
        Shell::Zsh => &Zsh,
        Shell::Fish => &Fish,
        Shell::Powershell => &Powershell,
    };
    shell.write_registration(COMPLETE_VAR, "banger", "banger", &completer, &mut script)?;
    let mut script = String::from_utf8(script)?;
    if matches!(a.shell, Shell::Bash) {
        script = without_bash_fallback(&script);
    }
    print!("{script}");
    Ok(0)
}

/// Drops `-o bashdefault` from the bash `complete` lines: with it, bash falls
/// back to file names when banger offers nothing (say, no VM matches or the
/// daemon is down). Path arguments still complete: banger offers paths itself.
fn without_bash_fallback(script: &str) -> String {
    script.replace(" -o bashdefault", "")
}

/// How the script calls banger back: the path it was run by, made absolute
/// when it was relative (as `CompleteEnv` does for `COMPLETE=bash banger`).
fn completer_path() -> String {
    let argv0 = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "banger".into());
    let path = if argv0.components().count() > 1 && argv0.is_relative() {
        std::env::current_dir()
            .map(|d| d.join(&argv0))
            .unwrap_or(argv0)
    } else {
        argv0
    };
    path.to_string_lossy().into_owned()
}

/// Resources whose names complete from the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Vm,
    Image,
    Kernel,
}

/// `cmd` (the whole CLI) with live-name completers on the arguments that
/// take VM, image or kernel names.
pub fn with_completers(cmd: Command) -> Command {
    attach(cmd, &[])
}

fn attach(cmd: Command, path: &[String]) -> Command {
    let cmd = cmd.mut_args(|arg| match resource_for(path, &arg) {
        Some(r) => arg.add(ArgValueCompleter::new(move |current: &OsStr| {
            candidates(r, current)
        })),
        None => arg,
    });
    cmd.mut_subcommands(|sub| {
        let mut sub_path = path.to_vec();
        sub_path.push(sub.get_name().to_string());
        attach(sub, &sub_path)
    })
}

/// Which names `arg` of the subcommand at `path` (e.g. `["vm", "stop"]`)
/// takes. By convention VM arguments are named `vm`/`vms`, and image and
/// kernel ones `name`/`names` under `image`/`kernel`; commands that take
/// new or catalog names (pull, build, register) are left alone.
fn resource_for(path: &[String], arg: &Arg) -> Option<Resource> {
    let id = arg.get_id().as_str();
    match id {
        "image" => return Some(Resource::Image),
        "kernel_ref" => return Some(Resource::Kernel),
        _ => {}
    }
    if !arg.is_positional() {
        return None;
    }
    let top = path.first()?.as_str();
    let leaf = path.last()?.as_str();
    if matches!(leaf, "pull" | "build" | "register") {
        return None;
    }
    match (top, id) {
        ("vm", "vm" | "vms") => Some(Resource::Vm),
        ("image", "name" | "names") => Some(Resource::Image),
        ("kernel", "name" | "names") => Some(Resource::Kernel),
        _ => None,
    }
}

/// Names of `r` starting with `current`, with a one-line description each;
/// empty when the daemon does not answer in time.
fn candidates(r: Resource, current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(prefix) = current.to_str() else {
        return Vec::new();
    };
    let named = fetch(r).unwrap_or_default();
    named
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, help)| CompletionCandidate::new(name).help(Some(help.into())))
        .collect()
}

/// `(name, description)` of every `r` the running daemon knows.
fn fetch(r: Resource) -> Option<Vec<(String, String)>> {
    let client = Client::new(connect::socket_path().ok()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        tokio::time::timeout(DAEMON_TIMEOUT, async {
            Some(match r {
                Resource::Vm => client
                    .list_vms()
                    .await
                    .ok()?
                    .into_iter()
                    .map(|v| (v.name.to_string(), format!("{} VM, {}", v.state, v.image)))
                    .collect(),
                Resource::Image => client
                    .list_images()
                    .await
                    .ok()?
                    .into_iter()
                    .map(|i| (i.name, format!("image, kernel {}", i.kernel)))
                    .collect(),
                Resource::Kernel => client
                    .list_kernels()
                    .await
                    .ok()?
                    .into_iter()
                    .map(|k| {
                        let release = k.release.unwrap_or_else(|| "kernel".into());
                        (k.name, release)
                    })
                    .collect(),
            })
        })
        .await
        .ok()
        .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("banger")
            .subcommand(
                Command::new("vm")
                    .subcommand(Command::new("stop").arg(Arg::new("vms").num_args(1..)))
                    .subcommand(Command::new("ssh").arg(Arg::new("vm")))
                    .subcommand(
                        Command::new("create")
                            .arg(Arg::new("image").long("image"))
                            .arg(Arg::new("name").long("name")),
                    ),
            )
            .subcommand(
                Command::new("image")
                    .subcommand(Command::new("delete").arg(Arg::new("names").num_args(1..)))
                    .subcommand(Command::new("pull").arg(Arg::new("reference")))
                    .subcommand(Command::new("build").arg(Arg::new("name").long("name"))),
            )
            .subcommand(
                Command::new("kernel")
                    .subcommand(Command::new("show").arg(Arg::new("name")))
                    .subcommand(Command::new("pull").arg(Arg::new("name"))),
            )
    }

    fn resource(path: &[&str], arg: &str) -> Option<Resource> {
        let mut cmd = cli();
        for p in path {
            cmd = cmd.find_subcommand(p).expect("subcommand").clone();
        }
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == arg)
            .expect("argument");
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        resource_for(&path, arg)
    }

    #[test]
    fn resource_arguments_are_recognised() {
        assert_eq!(resource(&["vm", "stop"], "vms"), Some(Resource::Vm));
        assert_eq!(resource(&["vm", "ssh"], "vm"), Some(Resource::Vm));
        assert_eq!(resource(&["vm", "create"], "image"), Some(Resource::Image));
        assert_eq!(resource(&["vm", "create"], "name"), None);
        assert_eq!(
            resource(&["image", "delete"], "names"),
            Some(Resource::Image)
        );
        assert_eq!(resource(&["image", "pull"], "reference"), None);
        assert_eq!(resource(&["image", "build"], "name"), None);
        assert_eq!(
            resource(&["kernel", "show"], "name"),
            Some(Resource::Kernel)
        );
        assert_eq!(resource(&["kernel", "pull"], "name"), None);
    }

    #[test]
    fn completers_are_attached_through_the_tree() {
        let cmd = with_completers(cli());
        let stop = cmd
            .find_subcommand("vm")
            .and_then(|c| c.find_subcommand("stop"))
            .expect("vm stop");
        let vms = stop
            .get_arguments()
            .find(|a| a.get_id() == "vms")
            .expect("vms");
        assert!(vms.get::<ArgValueCompleter>().is_some());
        let create = cmd
            .find_subcommand("vm")
            .and_then(|c| c.find_subcommand("create"))
            .expect("vm create");
        let name = create
            .get_arguments()
            .find(|a| a.get_id() == "name")
            .expect("name");
        assert!(name.get::<ArgValueCompleter>().is_none());
    }

    #[test]
    fn bash_script_has_no_file_name_fallback() {
        let mut script = Vec::new();
        Bash.write_registration(
            COMPLETE_VAR,
            "banger",
            "banger",
            "/usr/bin/banger",
            &mut script,
        )
        .expect("registration");
        let script = without_bash_fallback(&String::from_utf8(script).expect("utf-8"));
        assert!(script.contains("complete -o nospace"), "{script}");
        assert!(!script.contains("bashdefault"), "{script}");
        assert!(!script.contains("-o default"), "{script}");
    }

    #[test]
    fn no_daemon_means_no_candidates() {
        // SAFETY: tests in this module do not read the environment concurrently.
        unsafe { std::env::set_var("BANGER_SOCKET", "/nonexistent/banger.sock") };
        assert!(candidates(Resource::Vm, OsStr::new("")).is_empty());
    }
}
