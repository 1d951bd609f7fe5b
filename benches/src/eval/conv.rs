//! The `conv` task (issue 14, EpiCache's setting): long conversations in which several
//! topics are interleaved, each topic carrying one planted fact, and a set of questions
//! answered on the same (compressed) cache of the whole conversation.
//!
//! Built deterministically from MuSiQue-format examples and a seed: a conversation takes
//! 4 or 5 topics (alternately); a topic is one example's first [`PASSAGES`] passages, each
//! cut to [`PASSAGE_CHARS`] characters (~350 tokens), and a project label from
//! [`LABELS`]. Each passage becomes an exchange (the user asks for more on the project, the
//! assistant answers with the passage); one more exchange plants the topic's fact at a
//! random place among the topic's exchanges: a sentence giving a number of a kind (a room
//! number, a gate number, …: [`KINDS`]) and a person in a role ([`ROLES`], [`NAMES`]), kinds
//! and roles distinct within a conversation, so each question has one answer a model can
//! find by its words. Exchanges are interleaved round by round across the topics, in a
//! fresh random topic order each round, so every topic recurs through the conversation (~6k
//! tokens with 5 topics). Questions: for every topic, the number and the person (8 or 10
//! per conversation).

use anyhow::{Result, bail};
use kvquilt_blend::ChunkCodec;
use kvquilt_model::{ChatMessage, ChatTemplate, Tokenizer};
use serde::Serialize;

use super::data::{Example, SplitMix};
use super::policies::Item;

/// Passages per topic.
pub(crate) const PASSAGES: usize = 3;
/// Characters kept of each passage (~350 SmolLM2 tokens of MuSiQue text).
pub(crate) const PASSAGE_CHARS: usize = 1500;
/// Project labels topics are filed under (distinct within a conversation).
pub(crate) const LABELS: [&str; 12] = [
    "the garden project",
    "the Lisbon trip",
    "the tax filing",
    "the bike repair",
    "the book club",
    "the kitchen renovation",
    "the wedding speech",
    "the chess course",
    "the piano recital",
    "the camping weekend",
    "the science fair",
    "the photo album",
];

/// Kinds of the planted numbers (distinct within a conversation).
pub(crate) const KINDS: [&str; 10] = [
    "room number",
    "gate number",
    "locker number",
    "invoice number",
    "table number",
    "ticket number",
    "order number",
    "booking number",
    "parcel number",
    "membership number",
];
/// Roles of the planted people (distinct within a conversation).
pub(crate) const ROLES: [&str; 10] = [
    "plumber",
    "travel agent",
    "accountant",
    "mechanic",
    "host",
    "architect",
    "coach",
    "teacher",
    "photographer",
    "caterer",
];
/// First names of the planted people.
pub(crate) const NAMES: [&str; 12] = [
    "Maria", "Tomas", "Aiko", "Leon", "Priya", "Oskar", "Fatima", "Diego", "Ingrid", "Kwame",
    "Elena", "Ravi",
];

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Speaker {
    User,
    Assistant,
}

impl Speaker {
    /// The chat role.
    pub(crate) fn role(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One utterance.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Turn {
    pub speaker: Speaker,
    pub text: String,
    /// The topic it belongs to (index into [`Conversation::labels`]).
    pub topic: usize,
}

/// A question about the conversation and its expected answer.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Question {
    pub text: String,
    /// How the assistant's answer begins (the answer follows it), as needle's answer hint
    /// steers a small model to the value instead of a restatement.
    pub opening: String,
    pub answer: String,
    /// The topic whose fact it asks about.
    pub topic: usize,
}

/// One conversation of the task.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Conversation {
    /// Each topic's project label.
    pub labels: Vec<String>,
    /// Each topic's planted number.
    pub codes: Vec<String>,
    /// Each topic's planted person.
    pub names: Vec<String>,
    pub turns: Vec<Turn>,
    pub questions: Vec<Question>,
}

impl Conversation {
    /// The utterances as EpiCache segments them: `{speaker} said, "{text}"` per line.
    pub(crate) fn utterances(&self) -> Vec<String> {
        self.turns
            .iter()
            .map(|t| {
                let who = match t.speaker {
                    Speaker::User => "User",
                    Speaker::Assistant => "Assistant",
                };
                format!("{who} said, \"{}\"\n", t.text)
            })
            .collect()
    }

    /// The turn that plants topic `topic`'s fact.
    pub(crate) fn fact_turn(&self, topic: usize) -> Option<usize> {
        let code = self.codes.get(topic)?;
        self.turns
            .iter()
            .position(|t| t.text.contains(code.as_str()))
    }
}

/// `count` conversations from `examples` (each topic one example, used once until every
/// example has been used), deterministic in `seed`.
pub(crate) fn conversations(
    examples: &[Example],
    count: usize,
    seed: u64,
) -> Result<Vec<Conversation>> {
    let usable: Vec<&Example> = examples
        .iter()
        .filter(|e| e.ctxs.len() >= PASSAGES)
        .collect();
    if usable.len() < 5 {
        bail!(
            "the conv task needs at least 5 examples with {PASSAGES} passages, got {}",
            usable.len()
        );
    }
    let mut rng = SplitMix(seed);
    let mut next = 0usize;
    let mut out = Vec::with_capacity(count);
    for c in 0..count {
        let topics = 4 + c % 2;
        let mut labels: Vec<&str> = LABELS.to_vec();
        let (mut kinds, mut roles, mut names) = (KINDS.to_vec(), ROLES.to_vec(), NAMES.to_vec());
        let mut exchanges: Vec<Vec<(String, String)>> = Vec::with_capacity(topics);
        let (mut chosen, mut codes, mut people) = (Vec::new(), Vec::new(), Vec::new());
        let mut questions = Vec::with_capacity(2 * topics);
        // the conversation's passages first: a planted number must appear nowhere else
        let texts: Vec<String> = (0..topics)
            .flat_map(|k| usable[(next + k) % usable.len()].ctxs[..PASSAGES].iter())
            .map(|p| cut(&p.text, PASSAGE_CHARS))
            .collect();
        let lower: Vec<String> = texts.iter().map(|x| x.to_lowercase()).collect();
        for t in 0..topics {
            let label = labels.remove(rng.below(labels.len()));
            let kind = kinds.remove(rng.below(kinds.len()));
            let role = roles.remove(rng.below(roles.len()));
            // a name the passages do not mention (they are lower-cased), when one is left
            let unseen: Vec<usize> = (0..names.len())
                .filter(|&k| !lower.iter().any(|x| x.contains(&names[k].to_lowercase())))
                .collect();
            let name = match unseen.len() {
                0 => names.remove(rng.below(names.len())),
                n => names.remove(unseen[rng.below(n)]),
            };
            let example = usable[next % usable.len()];
            next += 1;
            let code = loop {
                let code = format!("{}", 1000 + rng.below(9000));
                if !texts.iter().any(|x| x.contains(&code)) && !codes.contains(&code) {
                    break code;
                }
            };
            let mut ex: Vec<(String, String)> = example.ctxs[..PASSAGES]
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let ask = if i == 0 {
                        format!("I'm collecting background for {label}. What can you tell me?")
                    } else {
                        format!("Tell me more for {label}.")
                    };
                    (ask, cut(&p.text, PASSAGE_CHARS))
                })
                .collect();
            let fact = (
                format!(
                    "Please remember this for {label}: the {kind} is {code}, and the {role} is {name}."
                ),
                "Got it, I will keep that in mind.".to_string(),
            );
            questions.push(Question {
                text: format!("What is the {kind} for {label}?"),
                opening: format!("The {kind} for {label} is"),
                answer: code.clone(),
                topic: t,
            });
            questions.push(Question {
                text: format!("Who is the {role} for {label}?"),
                opening: format!("The {role} for {label} is"),
                answer: name.to_string(),
                topic: t,
            });
            // never first: the topic is introduced before its fact
            let at = 1 + rng.below(ex.len());
            ex.insert(at, fact);
            exchanges.push(ex);
            chosen.push(label.to_string());
            codes.push(code);
            people.push(name.to_string());
        }
        // interleave: round r takes every topic's r-th exchange, topics in a fresh order
        let rounds = exchanges.iter().map(Vec::len).max().unwrap_or(0);
        let mut turns = Vec::new();
        for r in 0..rounds {
            let mut order: Vec<usize> = (0..topics).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            for t in order {
                if let Some((ask, reply)) = exchanges[t].get(r) {
                    turns.push(Turn {
                        speaker: Speaker::User,
                        text: ask.clone(),
                        topic: t,
                    });
                    turns.push(Turn {
                        speaker: Speaker::Assistant,
                        text: reply.clone(),
                        topic: t,
                    });
                }
            }
        }
        out.push(Conversation {
            labels: chosen,
            codes,
            names: people,
            turns,
            questions,
        });
    }
    Ok(out)
}

/// The system message of every conversation.
pub(crate) const SYSTEM: &str =
    "You are a helpful assistant. Answer the user's questions from the conversation so far.";

/// Each conversation as an evaluation item: the context is the system message and every
/// turn as `template` renders them; each question is the user message that follows, the
/// assistant's turn opened by the template, and the question's answer opening (all
/// answered over the same cache of the context).
pub(crate) fn items(
    convs: &[Conversation],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> Result<Vec<Item>> {
    convs
        .iter()
        .map(|c| {
            let mut messages = vec![ChatMessage::new("system", SYSTEM)];
            messages.extend(c.turns.iter().map(|t| ChatMessage::new(t.speaker.role(), &t.text)));
            let context = template.render(&messages, false)?;
            let questions = c
                .questions
                .iter()
                .map(|q| {
                    let mut all = messages.clone();
                    all.push(ChatMessage::new("user", &q.text));
                    let whole = template.render(&all, true)?;
                    let Some(rest) = whole.strip_prefix(&context) else {
                        bail!("the chat template does not render a conversation as a prefix of its continuation");
                    };
                    let rest = format!("{rest}{}", q.opening);
                    Ok((
                        ChunkCodec::tokenize(tokenizer, &rest)?,
                        vec![q.answer.clone()],
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Item {
                context: ChunkCodec::tokenize(tokenizer, &context)?,
                questions,
            })
        })
        .collect()
}

/// `text` cut to at most `chars` characters, at the last space before the limit.
fn cut(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_string();
    }
    let head: String = text.chars().take(chars).collect();
    match head.rfind(' ') {
        Some(i) if i > chars / 2 => head[..i].to_string(),
        _ => head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::data;

    fn built_in() -> Vec<Example> {
        data::parse(
            include_str!("../../../data/musique_dev.json"),
            "data/musique_dev.json",
        )
        .unwrap()
    }

    #[test]
    fn conversations_interleave_topics_and_plant_each_fact_once() {
        let convs = conversations(&built_in(), 24, 3).unwrap();
        assert_eq!(convs.len(), 24);
        for (i, c) in convs.iter().enumerate() {
            let topics = c.labels.len();
            assert_eq!(topics, 4 + i % 2);
            assert!(c.questions.len() >= 8);
            // every label distinct, every code planted exactly once, after its topic began
            let mut l = c.labels.clone();
            l.dedup();
            assert_eq!(l.len(), topics);
            for (t, (code, name)) in c.codes.iter().zip(&c.names).enumerate() {
                let at: Vec<usize> = (0..c.turns.len())
                    .filter(|&k| c.turns[k].text.contains(code.as_str()))
                    .collect();
                let named: Vec<usize> = (0..c.turns.len())
                    .filter(|&k| c.turns[k].text.contains(name.as_str()))
                    .collect();
                assert_eq!(
                    named, at,
                    "conversation {i}, topic {t}: the person is in the fact"
                );
                assert_eq!(at.len(), 1, "conversation {i}, topic {t}: {at:?}");
                let first = c.turns.iter().position(|x| x.topic == t).unwrap();
                assert!(first < at[0]);
            }
            // topics recur through the conversation: the first half holds turns of each
            let half = &c.turns[..c.turns.len() / 2];
            for t in 0..topics {
                assert!(
                    half.iter().any(|x| x.topic == t),
                    "conversation {i}: topic {t}"
                );
                assert!(c.turns[c.turns.len() / 2..].iter().any(|x| x.topic == t));
            }
            // ~6k tokens with 5 topics: 15 passages of ≤ 1,500 characters
            let chars: usize = c.turns.iter().map(|x| x.text.len()).sum();
            assert!(
                chars > 13_000 * topics / 5,
                "conversation {i}: {chars} characters"
            );
        }
        // reproducible in the seed, different across seeds
        let again = conversations(&built_in(), 24, 3).unwrap();
        let other = conversations(&built_in(), 24, 4).unwrap();
        let json = |c: &Vec<Conversation>| serde_json::to_string(c).unwrap();
        assert_eq!(json(&convs), json(&again));
        assert_ne!(json(&convs), json(&other));
    }

    #[test]
    fn too_few_examples_is_an_error() {
        let few = built_in().into_iter().take(3).collect::<Vec<_>>();
        assert!(conversations(&few, 2, 1).is_err());
    }
}
