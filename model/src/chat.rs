//! Chat prompts: the model's own Jinja chat template (from GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja; plain ChatML when a model has none.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message, handed to the template unchanged.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` (`system`, `user` or `assistant`) saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML, used when a model ships no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The text of the tokenizer's BOS and EOS tokens (`bos_token`, `eos_token` in HF's
    /// templates; empty when unknown).
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// What one render of a chat template may spend (minijinja's fuel: about one per
/// instruction and per 64 bytes made): 2²⁴, so a template from a model file that loops
/// without end fails its render (at load, [`ChatTemplate::check`]) within a fraction of a
/// second and ~1 GiB, while a conversation of 65,536 messages needs a few million. Test
/// `tests::a_template_that_runs_without_end_fails_its_render`.
const TEMPLATE_FUEL: u64 = 1 << 24;

impl ChatTemplate {
    /// Compiles a Jinja template in HF's conventions (`messages`, `add_generation_prompt`,
    /// `bos_token`, `eos_token`, `raise_exception`, and Python's string and dict methods such
    /// as `.strip()` that HF's Jinja allows).
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: String::new(),
            eos_token: String::new(),
        })
    }

    /// `self` rendering `bos_token` and `eos_token` as these texts (the tokenizer's).
    pub fn with_special_tokens(self, bos_token: &str, eos_token: &str) -> Self {
        Self {
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            ..self
        }
    }

    /// Renders a system and a user message as a request would: a template that cannot
    /// (one that needs a variable kvquilt does not provide, or raises on these roles) is
    /// found when the model loads, not by its first chat request.
    pub fn check(&self) -> Result<()> {
        let probe = [
            ChatMessage::new("system", "You answer briefly."),
            ChatMessage::new("user", "Hello?"),
        ];
        self.render(&probe, true).map(drop)
    }

    /// Plain ChatML (`<|im_start|>role\ncontent<|im_end|>\n`).
    pub fn chatml() -> Self {
        Self::new(CHATML).expect("the built-in ChatML template compiles")
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages_value(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }
}

/// `[{role, content}, ...]` as a template value.
fn messages_value(messages: &[ChatMessage]) -> minijinja::Value {
    let list: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| {
            minijinja::Value::from_pairs([
                ("role", minijinja::Value::from(m.role.as_str())),
                ("content", minijinja::Value::from(m.content.as_str())),
            ])
        })
        .collect();
    minijinja::Value::from(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_adds_default_system() -> Result<()> {
        let t = ChatTemplate::new(SMOLLM2)?;
        let s = t.render(&[ChatMessage::new("user", "Hi?")], true)?;
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }

    #[test]
    fn a_template_that_runs_without_end_fails_its_render() {
        let nested = "{% for a in range(50000) %}{% for b in range(50000) %}{% for c in range(50000) %}x{% endfor %}{% endfor %}{% endfor %}";
        let e = ChatTemplate::new(nested).unwrap().check().unwrap_err();
        assert!(matches!(e, ModelError::ChatTemplate(_)), "{e}");
        // a long conversation stays well within the budget
        let many: Vec<ChatMessage> = (0..65_536)
            .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "hi"))
            .collect();
        ChatTemplate::chatml().render(&many, true).unwrap();
    }

    #[test]
    fn chatml_fallback() -> Result<()> {
        let s = ChatTemplate::chatml().render(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "U"),
            ],
            false,
        )?;
        assert_eq!(
            s,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
        Ok(())
    }

    /// Llama 3's stock template (its `bos_token +` opening), and Python string methods as
    /// other models' templates use them; an undefined variable fails `check`.
    #[test]
    fn hf_template_conventions_render() -> Result<()> {
        const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
        let t = ChatTemplate::new(LLAMA3)?.with_special_tokens("<|begin_of_text|>", "<|eot_id|>");
        t.check()?;
        let s = t.render(&[ChatMessage::new("user", " Hi? ")], true)?;
        assert_eq!(
            s,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let py = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'].strip().upper() }}{% if m['role'].startswith('u') %}{{ eos_token }}{% endif %}{% endfor %}",
        )?
        .with_special_tokens("<s>", "</s>");
        assert_eq!(
            py.render(&[ChatMessage::new("user", " hi ")], false)?,
            "HI</s>"
        );
        let undefined = ChatTemplate::new("{{ missing_variable + 'x' }}")?;
        assert!(undefined.check().is_err());
        Ok(())
    }

    #[test]
    fn broken_template_is_an_error() {
        assert!(ChatTemplate::new("{% for %}").is_err());
    }
}
