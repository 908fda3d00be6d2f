"""Optional techniques of KotodamaLM (the parameter-golf records' toolbox), one small module each."""

from kotodama_core.model.techniques.config import (BigramHashConfig, BigramLogitsConfig, RecurrenceConfig,
                                                   TechniquesConfig, ValueEmbedConfig)

__all__ = ["TechniquesConfig", "BigramLogitsConfig", "BigramHashConfig", "ValueEmbedConfig",
           "RecurrenceConfig"]
