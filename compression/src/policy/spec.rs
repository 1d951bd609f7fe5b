//! Naming a policy and its parameters: `snapkv`, `snapkv:window=32:kernel=7:pool=max`, …

use std::fmt;
use std::str::FromStr;

use super::{
    GroupReduce, H2o, KeptPositions, PolicyError, Pooling, SageKv, SnapKv, StreamingLlm,
    TokenPolicy,
};

/// A token policy by name, with its parameters (defaults as each policy documents).
///
/// Text form: `name[:key=value]*`. Names and keys: `full` (keeps everything);
/// `streaming` (`sinks`, `positions` original|compact); `h2o` (`recent` fraction, `normalise` true|false); `snapkv`
/// (`window`, `kernel`, `pool` avg|max, `group` mean|max); `sage` (`sinks`, `recent`). Unknown names or keys and
/// out-of-range values are errors naming them.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySpec {
    /// No compression: the reference every policy is compared with.
    Full,
    /// [`StreamingLlm`].
    Streaming(StreamingLlm),
    /// [`H2o`].
    H2o(H2o),
    /// [`SnapKv`].
    SnapKv(SnapKv),
    /// [`SageKv`].
    Sage(SageKv),
}

impl PolicySpec {
    /// The policy, or `None` for `full`.
    pub fn policy(&self) -> Option<&dyn TokenPolicy> {
        match self {
            Self::Full => None,
            Self::Streaming(p) => Some(p),
            Self::H2o(p) => Some(p),
            Self::SnapKv(p) => Some(p),
            Self::Sage(p) => Some(p),
        }
    }

    /// The policy's name (`full`, `streaming`, `h2o`, `snapkv`, `sage`).
    pub fn name(&self) -> &str {
        self.policy().map_or("full", |p| p.name())
    }
}

impl FromStr for PolicySpec {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let mut parts = s.trim().split(':');
        let name = parts.next().unwrap_or_default();
        let mut spec = match name {
            "full" => Self::Full,
            "streaming" | "streamingllm" => Self::Streaming(StreamingLlm::default()),
            "h2o" => Self::H2o(H2o::default()),
            "snapkv" => Self::SnapKv(SnapKv::default()),
            "sage" | "sage-kv" | "sagekv" => Self::Sage(SageKv::default()),
            other => return Err(PolicyError::UnknownPolicy(other.into())),
        };
        for kv in parts {
            let (key, value) = kv
                .split_once('=')
                .ok_or_else(|| PolicyError::BadParameter {
                    policy: name.into(),
                    field: kv.into(),
                    why: "expected key=value".into(),
                })?;
            spec.set(key.trim(), value.trim())?;
        }
        Ok(spec)
    }
}

impl PolicySpec {
    fn set(&mut self, key: &str, value: &str) -> Result<(), PolicyError> {
        let policy = self.name().to_string();
        let bad = |why: String| PolicyError::BadParameter {
            policy: policy.clone(),
            field: key.into(),
            why,
        };
        let count = |min: usize| -> Result<usize, PolicyError> {
            let n: usize = value
                .parse()
                .map_err(|_| bad(format!("`{value}` is not a whole number")))?;
            if n < min {
                return Err(bad(format!("{n} is below {min}")));
            }
            Ok(n)
        };
        match (self, key) {
            (Self::Streaming(p), "sinks") => p.sinks = count(0)?,
            (Self::Streaming(p), "positions") => {
                p.positions = match value {
                    "original" => KeptPositions::Original,
                    "compact" => KeptPositions::Compact,
                    other => {
                        return Err(bad(format!("`{other}` (expected original or compact)")));
                    }
                }
            }
            (Self::Sage(p), "sinks") => p.sinks = count(0)?,
            (Self::Sage(p), "recent") => p.recent = count(1)?,
            (Self::SnapKv(p), "window") => p.window = count(1)?,
            (Self::SnapKv(p), "kernel") => {
                let k = count(1)?;
                if k % 2 == 0 {
                    return Err(bad(format!("{k} is even (the pool is centred)")));
                }
                if k > super::snapkv::MAX_KERNEL {
                    return Err(bad(format!(
                        "{k} is wider than {} (the pooling's cost grows with it)",
                        super::snapkv::MAX_KERNEL
                    )));
                }
                p.kernel = k;
            }
            (Self::SnapKv(p), "pool") => {
                p.pooling = match value {
                    "avg" | "mean" => Pooling::Avg,
                    "max" => Pooling::Max,
                    other => return Err(bad(format!("`{other}` (expected avg or max)"))),
                }
            }
            (Self::SnapKv(p), "group") => {
                p.group = match value {
                    "mean" | "avg" => GroupReduce::Mean,
                    "max" => GroupReduce::Max,
                    other => return Err(bad(format!("`{other}` (expected mean or max)"))),
                }
            }
            (Self::H2o(p), "recent") => {
                let f: f32 = value
                    .parse()
                    .map_err(|_| bad(format!("`{value}` is not a number")))?;
                if !(0.0..1.0).contains(&f) {
                    return Err(bad(format!("{f} is outside 0..1")));
                }
                p.recent_fraction = f;
            }
            (Self::H2o(p), "normalise" | "normalize") => {
                p.normalise = value
                    .parse()
                    .map_err(|_| bad(format!("`{value}` (expected true or false)")))?
            }
            _ => return Err(bad("no such parameter".into())),
        }
        Ok(())
    }
}

impl fmt::Display for PolicySpec {
    /// The text form with every parameter, so that it parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => write!(f, "full"),
            // `positions=original` is the default and left out (the form older reports used)
            Self::Streaming(p) => match p.positions {
                KeptPositions::Original => write!(f, "streaming:sinks={}", p.sinks),
                KeptPositions::Compact => {
                    write!(f, "streaming:sinks={}:positions=compact", p.sinks)
                }
            },
            Self::H2o(p) => write!(
                f,
                "h2o:recent={}:normalise={}",
                p.recent_fraction, p.normalise
            ),
            Self::SnapKv(p) => write!(
                f,
                "snapkv:window={}:kernel={}:pool={}:group={}",
                p.window,
                p.kernel,
                match p.pooling {
                    Pooling::Avg => "avg",
                    Pooling::Max => "max",
                },
                match p.group {
                    GroupReduce::Mean => "mean",
                    GroupReduce::Max => "max",
                }
            ),
            Self::Sage(p) => write!(f, "sage:sinks={}:recent={}", p.sinks, p.recent),
        }
    }
}
