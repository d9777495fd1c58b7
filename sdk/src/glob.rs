//! Shell-style wildcard patterns, matched against a whole string: `*` matches any run of
//! characters (including none, including `/` and spaces), `?` exactly one character; every
//! other character matches itself (there is no escaping and no `[...]` class).
//!
//! ```
//! use opensandbox_plugin_sdk::glob;
//!
//! assert!(glob::matches("rm -rf *", "rm -rf /tmp/x"));
//! assert!(!glob::matches("rm -rf *", "sudo rm -rf /"));
//! assert_eq!(
//!     glob::captures("pip install *", "pip install numpy==2.0"),
//!     Some(vec!["numpy==2.0".to_string()])
//! );
//! ```

#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    Star,
    One,
    Char(char),
}

/// Whether `text` as a whole matches `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    captures(pattern, text).is_some()
}

/// If `text` as a whole matches `pattern`, the text matched by each wildcard (`*` and `?`), in
/// the pattern's order; `None` otherwise. Where several splits fit, earlier `*` match as little
/// as possible.
pub fn captures(pattern: &str, text: &str) -> Option<Vec<String>> {
    let tokens: Vec<Token> = pattern
        .chars()
        .map(|c| match c {
            '*' => Token::Star,
            '?' => Token::One,
            c => Token::Char(c),
        })
        .collect();
    // The capture slot of each token (wildcards only).
    let mut slot = vec![usize::MAX; tokens.len()];
    let mut wildcards = 0;
    for (i, t) in tokens.iter().enumerate() {
        if matches!(t, Token::Star | Token::One) {
            slot[i] = wildcards;
            wildcards += 1;
        }
    }
    let text: Vec<char> = text.chars().collect();
    let mut caps = vec![(0usize, 0usize); wildcards];
    let (mut p, mut t) = (0usize, 0usize);
    // The last `*` seen and where its match ends now: on a mismatch it takes one more character.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match tokens.get(p) {
            Some(Token::Star) => {
                caps[slot[p]] = (t, t);
                star = Some((p, t));
                p += 1;
            }
            Some(Token::One) => {
                caps[slot[p]] = (t, t + 1);
                p += 1;
                t += 1;
            }
            Some(Token::Char(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => {
                let (sp, end) = star?;
                let end = end + 1;
                caps[slot[sp]] = (caps[slot[sp]].0, end);
                star = Some((sp, end));
                p = sp + 1;
                t = end;
            }
        }
    }
    while let Some(Token::Star) = tokens.get(p) {
        caps[slot[p]] = (t, t);
        p += 1;
    }
    if p != tokens.len() {
        return None;
    }
    Some(
        caps.into_iter()
            .map(|(a, b)| text[a..b].iter().collect())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_wildcards() {
        assert!(matches("", ""));
        assert!(!matches("", "a"));
        assert!(matches("*", ""));
        assert!(matches("*", "anything at all"));
        assert!(matches("ls", "ls"));
        assert!(!matches("ls", "ls -l"));
        assert!(matches("ls*", "ls -l"));
        assert!(matches("l?", "ls"));
        assert!(!matches("l?", "l"));
        assert!(!matches("l?", "lss"));
        assert!(matches("*rm -rf /*", "sudo rm -rf / --no-preserve-root"));
        assert!(matches("a*b*c", "a-b-b-c"));
        assert!(!matches("a*b*c", "a-b-b-d"));
        assert!(matches("*.py", "x.py.py"));
        assert!(matches("ü?*", "üöä"));
    }

    #[test]
    fn captures_in_order() {
        assert_eq!(
            captures("pip install *", "pip install numpy pandas"),
            Some(vec!["numpy pandas".to_string()])
        );
        assert_eq!(
            captures("*=*", "a=b=c"),
            Some(vec!["a".to_string(), "b=c".to_string()])
        );
        assert_eq!(
            captures("?*?", "abcd"),
            Some(vec!["a".to_string(), "bc".to_string(), "d".to_string()])
        );
        assert_eq!(
            captures("a*b?d", "axxbxbcd"),
            Some(vec!["xxbx".to_string(), "c".to_string()])
        );
        assert_eq!(captures("x*", "x"), Some(vec![String::new()]));
        assert_eq!(captures("x*", "y"), None);
    }

    #[test]
    fn long_inputs_stay_fast() {
        let text = "a".repeat(20_000);
        assert!(!matches("*a*a*a*a*a*a*b", &text));
        assert!(matches("*a*a*a*a*a*a*", &text));
    }
}
