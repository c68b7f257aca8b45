//! The command line: global options anywhere before `--`, then a command's own words.

/// The help text (`coppice --help`).
pub const USAGE: &str = "\
usage: coppice [--url URL] [--api-key KEY] [--json] COMMAND

  sandbox list [--state running,paused] [--metadata KEY=VALUE]...
  sandbox info ID
  sandbox kill ID...
  sandbox pause ID | sandbox resume ID
  sandbox logs ID [-f] [--limit N]
  sandbox metrics ID
  sandbox exec ID [--user USER] [--cwd DIR] -- COMMAND...
  events tail [-f] [--sandbox ID] [--type TYPE]... [--limit N]
  webhooks list
  webhooks create NAME URL --event TYPE... [--secret SECRET]
  webhooks delete ID
  webhooks deliveries [WEBHOOK_ID]
  webhooks replay DELIVERY_ID
  templates list | templates delete ID
  snapshots list [--sandbox ID] | snapshots delete ID
  pool | pool warm TEMPLATE N | pool drain TEMPLATE
  keys list | keys create NAME | keys revoke ID
  doctor [--state-dir DIR]

The gateway is --url, else COPPICE_URL, else E2B_API_URL, else http://127.0.0.1:3000.
The key is --api-key, else COPPICE_API_KEY, else E2B_API_KEY.
--json prints the gateway's JSON instead of a table.
";

/// A parsed command line.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    /// The gateway's base URL, without a trailing slash.
    pub(crate) url: String,
    /// The API key, if any.
    pub(crate) api_key: Option<String>,
    /// `--json`.
    pub(crate) json: bool,
    /// The command's words and options, global ones removed.
    pub(crate) words: Words,
}

/// Why a command line was not run.
#[derive(Debug)]
pub(crate) enum ParseError {
    /// `-h`/`--help`, or no command.
    Help,
    /// A usage error, said in a sentence.
    Usage(String),
}

impl Invocation {
    pub(crate) fn parse(
        args: Vec<String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ParseError> {
        let mut url = None;
        let mut api_key = None;
        let mut json = false;
        let mut rest = Vec::new();
        let mut tail = Vec::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--" => {
                    tail = it.by_ref().collect();
                    break;
                }
                "-h" | "--help" | "help" if rest.is_empty() => return Err(ParseError::Help),
                "--json" => json = true,
                "--url" => url = Some(value(&mut it, "--url")?),
                "--api-key" => api_key = Some(value(&mut it, "--api-key")?),
                _ => {
                    if let Some(v) = a.strip_prefix("--url=") {
                        url = Some(v.to_owned());
                    } else if let Some(v) = a.strip_prefix("--api-key=") {
                        api_key = Some(v.to_owned());
                    } else {
                        rest.push(a);
                    }
                }
            }
        }
        if rest.is_empty() {
            return Err(ParseError::Help);
        }
        let url = url
            .or_else(|| env("COPPICE_URL"))
            .or_else(|| env("E2B_API_URL"))
            .unwrap_or_else(|| "http://127.0.0.1:3000".into());
        let url = url.trim_end_matches('/').to_owned();
        if !url.starts_with("http://") {
            return Err(ParseError::Usage(format!(
                "the gateway address {url:?} must start with http:// (the gateway serves plain HTTP and TLS on the same port, and this command speaks plain HTTP)"
            )));
        }
        let api_key = api_key
            .or_else(|| env("COPPICE_API_KEY"))
            .or_else(|| env("E2B_API_KEY"))
            .filter(|k| !k.is_empty());
        Ok(Self {
            url,
            api_key,
            json,
            words: Words { rest, tail },
        })
    }
}

fn value(it: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, ParseError> {
    it.next()
        .ok_or_else(|| ParseError::Usage(format!("{flag} needs a value")))
}

/// A command's words: options are taken out by name, and what is left must be positional.
#[derive(Debug, Clone, Default)]
pub(crate) struct Words {
    rest: Vec<String>,
    /// Everything after `--`, verbatim.
    pub(crate) tail: Vec<String>,
}

impl Words {
    /// Takes the next positional word (the first that does not start with `-`).
    pub(crate) fn next(&mut self) -> Option<String> {
        let i = self.rest.iter().position(|w| !w.starts_with('-'))?;
        Some(self.rest.remove(i))
    }

    /// The next positional word, or a usage error naming `what`.
    pub(crate) fn need(&mut self, what: &str) -> Result<String, String> {
        self.next().ok_or_else(|| format!("missing {what}"))
    }

    /// Whether `flag` (or `alias`) was given, removing it.
    pub(crate) fn flag(&mut self, flag: &str, alias: Option<&str>) -> bool {
        let before = self.rest.len();
        self.rest
            .retain(|w| w != flag && alias.is_none_or(|a| w != a));
        self.rest.len() != before
    }

    /// Every value of `--name VALUE` or `--name=VALUE`, removing them.
    pub(crate) fn values(&mut self, name: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut i = 0;
        let eq = format!("{name}=");
        while i < self.rest.len() {
            if self.rest[i] == name {
                if i + 1 >= self.rest.len() {
                    return Err(format!("{name} needs a value"));
                }
                self.rest.remove(i);
                out.push(self.rest.remove(i));
            } else if let Some(v) = self.rest[i].strip_prefix(&eq) {
                out.push(v.to_owned());
                self.rest.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(out)
    }

    /// The last value of `--name`, if given.
    pub(crate) fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        Ok(self.values(name)?.pop())
    }

    /// `--name N` as a whole number in `1..=max`, if given.
    pub(crate) fn number(&mut self, name: &str, max: u64) -> Result<Option<u64>, String> {
        self.value(name)?
            .map(|v| match v.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(format!(
                    "{name} must be a whole number from 1 to {max}, not {v:?}"
                )),
            })
            .transpose()
    }

    /// Fails on anything not taken: an unknown option or a word too many.
    pub(crate) fn done(self) -> Result<(), String> {
        match self.rest.first() {
            None => Ok(()),
            Some(w) if w.starts_with('-') => Err(format!("unknown option {w}")),
            Some(w) => Err(format!("unexpected argument {w:?}")),
        }
    }

    /// The remaining positional words (all of them), failing on an unknown option.
    pub(crate) fn all(mut self) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        while let Some(w) = self.next() {
            out.push(w);
        }
        self.done().map(|()| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Invocation, ParseError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Invocation::parse(args.iter().map(|s| (*s).to_owned()).collect(), &|k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn global_options_go_anywhere_and_the_environment_fills_in() {
        let i = parse(
            &["sandbox", "list", "--json"],
            &[("E2B_API_URL", "http://h:1/")],
        )
        .unwrap();
        assert!(i.json);
        assert_eq!(i.url, "http://h:1");
        assert_eq!(i.api_key, None);
        let i = parse(
            &["--url=http://a:2", "pool"],
            &[("COPPICE_URL", "http://b:3"), ("E2B_API_KEY", "k")],
        )
        .unwrap();
        assert_eq!(i.url, "http://a:2");
        assert_eq!(i.api_key.as_deref(), Some("k"));
        let i = parse(&["pool"], &[]).unwrap();
        assert_eq!(i.url, "http://127.0.0.1:3000");
    }

    #[test]
    fn https_and_missing_values_are_usage_errors() {
        assert!(matches!(
            parse(&["--url", "https://x", "pool"], &[]),
            Err(ParseError::Usage(m)) if m.contains("http://")
        ));
        assert!(matches!(
            parse(&["pool", "--url"], &[]),
            Err(ParseError::Usage(_))
        ));
        assert!(matches!(parse(&[], &[]), Err(ParseError::Help)));
        assert!(matches!(parse(&["--help"], &[]), Err(ParseError::Help)));
    }

    #[test]
    fn words_take_options_positionals_and_the_tail() {
        let i = parse(
            &[
                "sandbox", "exec", "abc", "--user", "root", "--", "ls", "-la", "--json",
            ],
            &[],
        )
        .unwrap();
        assert!(!i.json, "--json after -- belongs to the command");
        let mut w = i.words;
        assert_eq!(w.next().as_deref(), Some("sandbox"));
        assert_eq!(w.next().as_deref(), Some("exec"));
        assert_eq!(w.value("--user").unwrap().as_deref(), Some("root"));
        assert_eq!(w.tail, ["ls", "-la", "--json"]);
        assert_eq!(w.need("ID").unwrap(), "abc");
        w.done().unwrap();

        let mut w = parse(&["events", "tail", "--type", "a", "--type=b", "-x"], &[])
            .unwrap()
            .words;
        assert_eq!(w.values("--type").unwrap(), ["a", "b"]);
        assert!(!w.flag("-f", Some("--follow")));
        assert_eq!(w.all().unwrap_err(), "unknown option -x");

        let mut w = parse(&["logs", "--limit", "0"], &[]).unwrap().words;
        w.number("--limit", 10).unwrap_err();
    }
}
