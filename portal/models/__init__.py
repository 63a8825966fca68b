"""All models, imported so that ``Base.metadata`` knows every table."""

from portal.models.catalog import Topic, TopicWording
from portal.models.change import Change
from portal.models.consent import (
    ConsentEvent,
    ConsentProof,
    ConsentState,
    ContactRule,
    Dispatch,
    Suppression,
)
from portal.models.customer import Customer, ExternalId

__all__ = [
    "Change",
    "ConsentEvent",
    "ConsentProof",
    "ConsentState",
    "ContactRule",
    "Customer",
    "Dispatch",
    "ExternalId",
    "Suppression",
    "Topic",
    "TopicWording",
]
