"""All models, imported so that ``Base.metadata`` knows every table."""

from portal.core.ratelimit_counters import RateLimitCounter
from portal.loyalty.models import (
    IdempotencyRecord,
    LedgerEntry,
    Lot,
    LotAllocation,
    Member,
    TermsAcceptance,
)
from portal.models import decision_facts  # noqa: F401  (the triggers that keep copies)
from portal.models.api import ApiKey, Webhook, WebhookDelivery
from portal.models.catalog import Topic, TopicWording
from portal.models.consent import (
    ConsentEvent,
    ConsentProof,
    ConsentState,
    ContactRule,
    Dispatch,
    Suppression,
)
from portal.models.customer import Customer, ExternalId, SignInSession, UsedLink
from portal.models.google_wallet import GoogleNotification, GoogleWalletObject, WalletFeedCursor
from portal.models.wallet import (
    AppleDeviceRegistration,
    ApplePass,
    ApplePush,
    WalletNews,
)
from portal.models.wallet_message import WalletMessage, WalletMessageRecipient
from portal.outbox.models import Change
from portal.push.models import PushDelivery, PushMessage, PushSubscription, PushTopicChoice

__all__ = [
    "ApiKey",
    "AppleDeviceRegistration",
    "ApplePass",
    "ApplePush",
    "Change",
    "ConsentEvent",
    "ConsentProof",
    "ConsentState",
    "ContactRule",
    "Customer",
    "Dispatch",
    "ExternalId",
    "GoogleNotification",
    "GoogleWalletObject",
    "IdempotencyRecord",
    "LedgerEntry",
    "Lot",
    "LotAllocation",
    "Member",
    "PushDelivery",
    "PushMessage",
    "PushSubscription",
    "PushTopicChoice",
    "RateLimitCounter",
    "SignInSession",
    "Suppression",
    "TermsAcceptance",
    "Topic",
    "TopicWording",
    "UsedLink",
    "WalletFeedCursor",
    "WalletMessage",
    "WalletMessageRecipient",
    "WalletNews",
    "Webhook",
    "WebhookDelivery",
]
