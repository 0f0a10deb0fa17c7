"""Compel itself, as the independent reference for the embeddings Sfumato reads from the text encoders."""
from __future__ import annotations


def compel_for(encoder):
    """A full Compel object on the encoder's model, built as Sfumato built it before reading layers itself:
    the independent reference for what the default Clip skip must give."""
    return compel_reference(encoder._components, two_encoders=len(encoder.encoding.text_encoders) == 2)


def compel_reference(pipeline, two_encoders: bool):
    from compel import Compel, ReturnedEmbeddingsType

    if two_encoders:
        return Compel(tokenizer=[pipeline.tokenizer, pipeline.tokenizer_2], text_encoder=[pipeline.text_encoder, pipeline.text_encoder_2],
                      returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                      requires_pooled=[False, True], truncate_long_prompts=False)
    return Compel(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, truncate_long_prompts=False)
