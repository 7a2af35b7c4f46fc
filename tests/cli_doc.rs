//! `--help` and the README agree: every subcommand says what it does in one line and shows an
//! example that parses, and every command line that the docs' code blocks show for a binary
//! names a real subcommand with real flags and valid values.
//!
//! Used by each binary's unit test: `assert_agree_with_readmes(Cli::command(), env!("CARGO_MANIFEST_DIR"))`.

use clap::Command;
use std::path::Path;

/// [`assert_agree`] with the workspace README and the crate's own README (when it has one).
pub fn assert_agree_with_readmes(cmd: Command, crate_dir: &str) {
    let dir = Path::new(crate_dir);
    let docs: Vec<(String, String)> = [dir.join("../README.md"), dir.join("README.md")]
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    assert!(!docs.is_empty(), "no README.md above {crate_dir}");
    let docs: Vec<Doc> = docs.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    assert_agree(cmd, &docs);
}

/// A doc file's name (for messages) and its text.
pub type Doc<'a> = (&'a str, &'a str);

/// Panics with every disagreement between `cmd` and the command lines of `docs`.
pub fn assert_agree(cmd: Command, docs: &[Doc]) {
    let mut errors = check_help(&cmd);
    let bin = cmd.get_name().to_string();
    let mut shown = 0;
    for (name, text) in docs {
        for (line, argv) in doc_commands(text, &bin) {
            shown += 1;
            if let Err(e) = parse(&cmd, &argv) {
                errors.push(format!("{name}:{line}: `{}`: {e}", argv.join(" ")));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{bin}: --help and the docs disagree:\n{}",
        errors.join("\n")
    );
    eprintln!("{bin}: every subcommand has an example; {shown} doc command line(s) parse");
}

/// The leaf subcommands of `cmd` with their full names (`["checkpoint", "verify"]`).
pub fn leaves(cmd: &Command) -> Vec<(Vec<String>, &Command)> {
    let mut out = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        if sub.has_subcommands() {
            for (mut path, leaf) in leaves(sub) {
                path.insert(0, sub.get_name().to_string());
                out.push((path, leaf));
            }
        } else {
            out.push((vec![sub.get_name().to_string()], sub));
        }
    }
    out
}

/// Every leaf: a one-line description, and at least one `Example:` line that parses in full.
pub fn check_help(cmd: &Command) -> Vec<String> {
    let bin = cmd.get_name();
    let mut errors = Vec::new();
    for (path, leaf) in leaves(cmd) {
        let name = format!("{bin} {}", path.join(" "));
        match leaf.get_about().map(|a| a.to_string()) {
            Some(a) if !a.trim().is_empty() && !a.contains('\n') => {}
            other => errors.push(format!(
                "{name}: needs a one-line description, has {other:?}"
            )),
        }
        let help = leaf
            .get_after_help()
            .map(|h| h.to_string())
            .unwrap_or_default();
        let examples = doc_commands(&help, bin);
        if !help.contains("Example") || examples.is_empty() {
            errors.push(format!(
                "{name}: --help shows no `Example:` line starting with `{bin}`"
            ));
        }
        for (_, argv) in examples {
            if argv.get(1..=path.len()) != Some(&path[..]) {
                errors.push(format!(
                    "{name}: its example runs another subcommand: `{}`",
                    argv.join(" ")
                ));
            } else if let Err(e) = parse(cmd, &argv) {
                errors.push(format!("{name}: example `{}`: {e}", argv.join(" ")));
            }
        }
    }
    errors
}

fn parse(cmd: &Command, argv: &[String]) -> Result<(), String> {
    cmd.clone()
        .try_get_matches_from(argv)
        .map(|_| ())
        .map_err(|e| {
            e.render()
                .to_string()
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
}

/// The command lines for `bin` in `text`, with their 1-based line numbers: every line of a
/// fenced code block (or of `--help` text) whose first word, after `VAR=value` settings and a
/// label such as `Example:`, is
/// `bin` or a path ending in `/bin`. Continuations (`\`) are joined; a `# comment` and anything
/// after a shell operator (`|`, `>`, `&&`, `;`) are cut; optional parts written `[--flag V]` are
/// kept without their brackets and `a|b` alternatives become `a`, so the line parses in full.
/// A `...` placeholder is kept, so it fails to parse: docs show whole, copyable commands.
pub fn doc_commands(text: &str, bin: &str) -> Vec<(usize, Vec<String>)> {
    let fenced = text.lines().any(|l| l.trim_start().starts_with("```"));
    let mut out = Vec::new();
    let mut in_block = !fenced;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let (n, joined) = match pending.take() {
            Some((n, mut acc)) => {
                acc.push(' ');
                acc.push_str(line.trim());
                (n, acc)
            }
            None => (i + 1, line.trim().to_string()),
        };
        if let Some(head) = joined.strip_suffix('\\') {
            pending = Some((n, head.to_string()));
            continue;
        }
        if let Some(argv) = command_words(&joined, bin) {
            out.push((n, argv));
        }
    }
    out
}

fn command_words(line: &str, bin: &str) -> Option<Vec<String>> {
    let line = match line.find(" #") {
        Some(k) => &line[..k],
        None => line,
    };
    let mut words = line
        .split_whitespace()
        .skip_while(|w| (w.contains('=') && !w.starts_with('-')) || w.ends_with(':'))
        .peekable();
    let first = words.next()?;
    if first != bin && !first.ends_with(&format!("/{bin}")) {
        return None;
    }
    let mut argv = vec![bin.to_string()];
    for w in words {
        if matches!(w, "|" | ">" | ">>" | "2>" | "2>&1" | "&&" | ";" | "&") {
            break;
        }
        let w = w.trim_matches(|c| matches!(c, '[' | ']' | '\'' | '"'));
        let w = w.split('|').next().unwrap_or(w);
        if !w.is_empty() {
            argv.push(w.to_string());
        }
    }
    Some(argv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Arg;

    fn demo() -> Command {
        Command::new("demo")
            .subcommand(
                Command::new("run")
                    .about("Runs it.")
                    .after_help("Example: demo run --size 3")
                    .arg(
                        Arg::new("size")
                            .long("size")
                            .required(true)
                            .value_parser(clap::value_parser!(u32)),
                    )
                    .arg(Arg::new("mode").long("mode").value_parser(["a", "b"])),
            )
            .subcommand(
                Command::new("ring").subcommand(
                    Command::new("show")
                        .about("Shows it.")
                        .after_help("Example:\n  demo ring show"),
                ),
            )
    }

    #[test]
    fn code_blocks_become_argv() {
        let readme = "demo run --size 1\n```\nX=1 ./target/release/demo run --size 2 \\\n  [--mode a|b]  # note\ncargo build\ndemo run --size 3 | tee log\n```\ndemo run outside\n";
        let got = doc_commands(readme, "demo");
        let want = vec![
            (3, vec!["demo", "run", "--size", "2", "--mode", "a"]),
            (6, vec!["demo", "run", "--size", "3"]),
        ];
        let want: Vec<(usize, Vec<String>)> = want
            .into_iter()
            .map(|(n, v)| (n, v.into_iter().map(String::from).collect()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn help_with_examples_passes_and_nested_leaves_are_found() {
        let cmd = demo();
        let names: Vec<String> = leaves(&cmd).iter().map(|(p, _)| p.join(" ")).collect();
        assert_eq!(names, ["run", "ring show"]);
        assert_eq!(check_help(&cmd), Vec::<String>::new());
        assert_agree(
            cmd,
            &[(
                "README",
                "```\ndemo run --size 4 --mode b\ndemo ring show\n```",
            )],
        );
    }

    #[test]
    fn each_kind_of_disagreement_is_reported() {
        let cmd = demo().subcommand(Command::new("bare"));
        let errors = check_help(&cmd);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("demo bare: needs a one-line description"));
        assert!(errors[1].contains("demo bare: --help shows no `Example:`"));
        let wrong_example = Command::new("demo").subcommand(
            Command::new("run")
                .about("Runs.")
                .after_help("Example: demo run --size x"),
        );
        assert_eq!(check_help(&wrong_example).len(), 1);
        for bad in [
            "demo run --size 1 --colour red", // no such flag
            "demo run --size 1 --mode c",     // value not allowed
            "demo run",                       // required flag missing
            "demo walk",                      // no such subcommand
            "demo run --size ...",            // placeholder
        ] {
            let doc = format!("```\n{bad}\n```");
            let r = std::panic::catch_unwind(|| assert_agree(demo(), &[("README", doc.as_str())]));
            assert!(r.is_err(), "`{bad}` was accepted");
        }
    }
}
