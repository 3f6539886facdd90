//! The prompt syntax of AUTOMATIC1111's web UI (`--prompt-syntax a1111`): emphasis brackets,
//! escapes, `BREAK`, and the `<lora:NAME:W>` tags of its extra networks.
//!
//! Written from the web UI's documented behaviour (`modules/prompt_parser.py`
//! `parse_prompt_attention`, `modules/extra_networks.py` `parse_prompt`), with its quirks, so
//! that a prompt copied from a model page weighs the same words the same way:
//! - `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies by
//!   1.3; brackets left open apply up to the end; a `)` or `]` with nothing open is text.
//! - `\(`, `\)`, `\[`, `\]`, `\\` are the literal characters; a lone `\` vanishes.
//! - `BREAK` (a whole word, in capitals) ends the current 75-token chunk. Inside brackets its
//!   weight is no longer -1, so the web UI encodes it as the word "break": so does sdgen.
//! - Weights are multiplied in the web UI's order in f64, and neighbouring pieces of equal
//!   weight are merged, so the pieces (and the tokenization of each) are the web UI's.
//!
//! Prompt editing (`[a:b:0.5]`, `[a|b]`) and `AND` are not part of this syntax here: they stay
//! text, as with the web UI's emphasis setting "None".

use anyhow::{bail, Result};

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text with the weight its brackets give it.
    Text(String, f64),
    /// `BREAK`: start a new chunk.
    Break,
}

/// The lexical units of the web UI's `re_attention`, in the order it tries them.
enum Lexeme<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` (the character) or a lone `\` (nothing).
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:1.3)`, holding the number's text.
    WeightClose(&'a str),
    Close,
    CloseSquare,
    /// A run of characters that are none of `\ ( ) [ ] :`, or a lone `:`.
    Text(&'a str),
}

fn next_lexeme(s: &str) -> Option<(Lexeme<'_>, usize)> {
    let c = s.chars().next()?;
    Some(match c {
        '\\' => match s[1..].chars().next() {
            Some(e @ ('(' | ')' | '[' | ']' | '\\')) => {
                (Lexeme::Escaped(&s[1..1 + e.len_utf8()]), 2)
            }
            _ => (Lexeme::Escaped(""), 1),
        },
        '(' => (Lexeme::Open, 1),
        '[' => (Lexeme::OpenSquare, 1),
        ':' => {
            let body = &s[1..];
            let sign = usize::from(body.starts_with(['+', '-']));
            let n = body[sign..]
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(body.len() - sign);
            if n > 0 && body[sign + n..].starts_with(')') {
                (Lexeme::WeightClose(&body[..sign + n]), 1 + sign + n + 1)
            } else {
                (Lexeme::Text(":"), 1)
            }
        }
        ')' => (Lexeme::Close, 1),
        ']' => (Lexeme::CloseSquare, 1),
        _ => {
            let n = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
            (Lexeme::Text(&s[..n]), n)
        }
    })
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before_ok = !text[..at].chars().next_back().is_some_and(is_word);
        let after_ok = !text[end..].chars().next().is_some_and(is_word);
        if !(before_ok && after_ok) {
            search = at + 1;
            continue;
        }
        // the match takes the whitespace before it, back to where the last match ended
        let lead = text[part_start..at]
            .chars()
            .rev()
            .take_while(|c| c.is_whitespace())
            .map(char::len_utf8)
            .sum::<usize>();
        let trail = text[end..]
            .chars()
            .take_while(|c| c.is_whitespace())
            .map(char::len_utf8)
            .sum::<usize>();
        parts.push(&text[part_start..at - lead]);
        part_start = end + trail;
        search = part_start;
    }
    parts.push(&text[part_start..]);
    parts
}

/// `parse_prompt_attention`: the prompt as pieces of text with weights, and `BREAK`s.
pub fn parse(text: &str) -> Result<Vec<Piece>> {
    // (text, weight) as the web UI keeps them; a BREAK is ("BREAK", -1) until the end
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for p in &mut res[from..] {
            p.1 *= m;
        }
    };
    let mut rest = text;
    while let Some((lexeme, len)) = next_lexeme(rest) {
        rest = &rest[len..];
        match lexeme {
            Lexeme::Escaped(s) => res.push((s.to_string(), 1.0)),
            Lexeme::Open => round.push(res.len()),
            Lexeme::OpenSquare => square.push(res.len()),
            Lexeme::WeightClose(w) if !round.is_empty() => {
                let Ok(weight) = w.parse::<f64>() else {
                    bail!("cannot read the weight {w:?} in the prompt (a number such as 1.3 is expected)");
                };
                let from = round.pop().unwrap_or_default();
                multiply(&mut res, from, weight);
            }
            Lexeme::Close if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut res, from, 1.1);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap_or_default();
                multiply(&mut res, from, 1.0 / 1.1);
            }
            other => {
                let s = match other {
                    Lexeme::Text(s) => s.to_string(),
                    Lexeme::WeightClose(w) => format!(":{w})"),
                    Lexeme::Close => ")".into(),
                    Lexeme::CloseSquare => "]".into(),
                    _ => unreachable!("handled above"),
                };
                for (i, part) in split_break(&s).into_iter().enumerate() {
                    if i > 0 {
                        res.push(("BREAK".into(), -1.0));
                    }
                    res.push((part.to_string(), 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (t, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(t, w)| {
            if t == "BREAK" && w == -1.0 {
                Piece::Break
            } else {
                Piece::Text(t, w)
            }
        })
        .collect())
}

/// A `<lora:NAME:W>` tag: the web UI's multipliers for the text encoder and the U-Net.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub te_scale: f64,
    pub unet_scale: f64,
}

/// Takes the extra-network tags `<KIND:ARGS>` (KIND a word) out of the prompt, as the web UI
/// does before parsing it: the prompt without them, and the `lora` ones. `<lora:NAME>` has
/// weight 1, `<lora:NAME:W>` weight W for both models, `<lora:NAME:TE:UNET>` one each (also as
/// `te=`/`unet=`). Tags of other kinds (`hypernet`, ...) are an error: sdgen has none.
pub fn take_lora_tags(prompt: &str) -> Result<(String, Vec<LoraTag>)> {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let after = &rest[lt + 1..];
        let kind_len = after.find(|c: char| !is_word(c)).unwrap_or(after.len());
        let args_end = after[kind_len..]
            .strip_prefix(':')
            .and_then(|a| a.find('>').map(|n| (n, a)));
        let Some((args_len, args)) = args_end.filter(|(n, _)| kind_len > 0 && *n > 0) else {
            out.push('<');
            rest = after;
            continue;
        };
        let kind = &after[..kind_len];
        let args = &args[..args_len];
        if kind != "lora" {
            bail!("the prompt's <{kind}:...> tag asks for a {kind:?} extra network; sdgen applies only <lora:...>");
        }
        tags.push(lora_tag(args)?);
        rest = &after[kind_len + 1 + args_len + 1..];
    }
    out.push_str(rest);
    Ok((out, tags))
}

fn lora_tag(args: &str) -> Result<LoraTag> {
    let items: Vec<&str> = args.split(':').collect();
    let number = |s: &str| -> Result<f64> {
        s.trim().parse::<f64>().map_err(|_| {
            anyhow::anyhow!(
                "cannot read the weight {s:?} in <lora:{args}> (a number such as 0.8 is expected)"
            )
        })
    };
    let (mut te, mut unet) = (None, None);
    let mut positional = Vec::new();
    for item in &items[1..] {
        if let Some(v) = item.strip_prefix("te=") {
            te = Some(number(v)?);
        } else if let Some(v) = item.strip_prefix("unet=") {
            unet = Some(number(v)?);
        } else {
            positional.push(number(item)?);
        }
    }
    let te = te.or(positional.first().copied()).unwrap_or(1.0);
    let unet = unet.or(positional.get(1).copied()).unwrap_or(te);
    Ok(LoraTag {
        name: items[0].to_string(),
        te_scale: te,
        unet_scale: unet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, w: f64) -> Piece {
        Piece::Text(s.into(), w)
    }

    /// The examples of the web UI's `parse_prompt_attention` docstring.
    #[test]
    fn web_ui_docstring_examples() {
        assert_eq!(parse("normal text").unwrap(), vec![t("normal text", 1.0)]);
        assert_eq!(
            parse("an (important) word").unwrap(),
            vec![t("an ", 1.0), t("important", 1.1), t(" word", 1.0)]
        );
        assert_eq!(parse("(unbalanced").unwrap(), vec![t("unbalanced", 1.1)]);
        assert_eq!(parse(r"\(literal\]").unwrap(), vec![t("(literal]", 1.0)]);
        assert_eq!(
            parse("(unnecessary)(parens)").unwrap(),
            vec![t("unnecessaryparens", 1.1)]
        );
        assert_eq!(
            parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).").unwrap(),
            vec![
                t("a ", 1.0),
                t("house", 1.5730000000000004),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641000000000006),
                t(".", 1.1),
            ]
        );
    }

    #[test]
    fn breaks_escapes_and_stray_brackets() {
        assert_eq!(
            parse("a BREAK b").unwrap(),
            vec![t("a", 1.0), Piece::Break, t("b", 1.0)]
        );
        // not a whole word: text
        assert_eq!(parse("BREAKfast").unwrap(), vec![t("BREAKfast", 1.0)]);
        // inside brackets the -1 is multiplied: the word stays, weighed -1.1
        assert_eq!(
            parse("(a BREAK b)").unwrap(),
            vec![t("a", 1.1), t("BREAK", -1.1), t("b", 1.1)]
        );
        assert_eq!(parse("a) b]").unwrap(), vec![t("a) b]", 1.0)]);
        assert_eq!(parse(r"x \ y \\").unwrap(), vec![t(r"x  y \", 1.0)]);
        assert_eq!(parse("time: 12:30").unwrap(), vec![t("time: 12:30", 1.0)]);
        assert_eq!(parse("x:1.5)").unwrap(), vec![t("x:1.5)", 1.0)]);
        assert_eq!(parse("(x:-1)").unwrap(), vec![t("x", -1.0)]);
        assert_eq!(parse("").unwrap(), vec![t("", 1.0)]);
        assert!(parse("(x:1.2.3)").is_err());
    }

    #[test]
    fn lora_tags_leave_the_prompt() {
        let (p, tags) = take_lora_tags("a fox <lora:water_color:0.8>, snow <lora:d> <x").unwrap();
        assert_eq!(p, "a fox , snow  <x");
        assert_eq!(
            tags,
            vec![
                LoraTag {
                    name: "water_color".into(),
                    te_scale: 0.8,
                    unet_scale: 0.8
                },
                LoraTag {
                    name: "d".into(),
                    te_scale: 1.0,
                    unet_scale: 1.0
                }
            ]
        );
        let (_, tags) = take_lora_tags("<lora:a:0.5:0.25><lora:b:unet=0.5>").unwrap();
        assert_eq!((tags[0].te_scale, tags[0].unet_scale), (0.5, 0.25));
        assert_eq!((tags[1].te_scale, tags[1].unet_scale), (1.0, 0.5));
        assert!(take_lora_tags("<hypernet:x:1>").is_err());
        assert!(take_lora_tags("<lora:x:heavy>").is_err());
    }
}
