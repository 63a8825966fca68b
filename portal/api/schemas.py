"""Request shapes shared by several operations, declared once (see :mod:`portal.api.schema`)."""

from __future__ import annotations

from typing import Any

from portal.api.schema import URL_CHAR, Arr, Bool, DateTime, Field, FieldError, Int, Obj, Str
from portal.models.catalog import CHANNELS

ExternalIdRef = Obj({
    "namespace": Str(min_length=1, max_length=64, example="crm"),
    "value": Str(min_length=1, max_length=255, example="C-1042"),
}, required=("namespace", "value"), name="ExternalId")

CustomerRef = Obj({
    "id": Str(min_length=1, max_length=40, description="Carnet customer id (cus_...)."),
    "email": Str(min_length=1, max_length=320),
    "phone": Str(min_length=1, max_length=32, description="E.164 preferably."),
    "member_number": Str(min_length=1, max_length=64,
                         description="Loyalty member number."),
    "external_id": ExternalIdRef,
}, exactly_one=True, name="CustomerRef",
    description="Exactly one identifier. Merged records resolve to the surviving customer.",
    example={"email": "ann@example.com"})

MAX_AUDIENCE = 10_000


class Audience(Field):
    """A message's audience: ``"all"`` or ``{"customers": [ids]}`` (push and wallet)."""

    def __init__(self, name: str, description: str) -> None:
        super().__init__(description=description)
        self.customers = Obj({
            "customers": Arr(Str(min_length=1, max_length=40, description="Carnet customer id."),
                             min_items=1, max_items=MAX_AUDIENCE),
        }, required=("customers",), name=name)

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if value == "all":
            return "all"
        if isinstance(value, dict):
            return self.customers.validate(value, path, errors)
        errors.append(FieldError(path, "type", 'must be "all" or {"customers": [ids]}'))
        return None

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"const": "all"}, self.customers.schema()],
                "description": self.description}


Channel = Str(enum=CHANNELS)
ChannelOrAll = Str(enum=(*CHANNELS, "*"))
Topic = Str(min_length=1, max_length=64, example="newsletter")

DecisionRequest = Obj({
    "customer": CustomerRef,
    "topic": Topic,
    "channel": Channel,
    "at": DateTime(description="When the message would be sent; default now."),
    "explain": Bool(description="Include the trace of rules evaluated."),
}, required=("customer", "topic", "channel"), name="DecisionRequest")

BatchRequest = Obj({
    "items": Arr(Obj({
        "customer": CustomerRef, "topic": Topic, "channel": Channel,
    }, required=("customer", "topic", "channel"), name="BatchItem"),
        min_items=1, max_items=10_000),
    "at": DateTime(),
    "explain": Bool(),
}, required=("items",), name="BatchRequest")

DispatchRequest = Obj({
    "customer": CustomerRef, "topic": Topic, "channel": Channel, "sent_at": DateTime(),
    "sender": Str(min_length=1, max_length=120),
    "message_id": Str(min_length=1, max_length=255, nullable=True),
}, required=("customer", "topic", "channel", "sender"), name="DispatchRequest")

CustomerFields: dict[str, Any] = {
    "email": Str(min_length=3, max_length=320, nullable=True),
    "phone": Str(min_length=3, max_length=32, nullable=True),
    "postal_address": Str(min_length=1, max_length=1000, nullable=True),
    "locale": Str(enum=("en", "fr"), nullable=True),
    "timezone": Str(min_length=1, max_length=64, nullable=True, example="Europe/Paris"),
    "external_ids": Arr(ExternalIdRef, max_items=20),
}
CustomerCreate = Obj(CustomerFields, name="CustomerCreate")

MergeRequest = Obj({"survivor": CustomerRef, "merged": CustomerRef},
                   required=("survivor", "merged"), name="MergeRequest")

ConsentRequest = Obj({
    "topic": Str(min_length=1, max_length=64, description="A topic key, or * for a switch."),
    "channel": ChannelOrAll,
    "state": Str(enum=("granted", "withdrawn")),
    "source": Str(enum=("api", "call_center", "store", "paper", "import", "sms", "web_push",
                        "loyalty", "system")),
    "actor": Str(min_length=1, max_length=120, description="Who recorded it (agent id...)."),
    "wording_version": Int(minimum=1, maximum=1_000_000, nullable=True,
                           description="The wording version the person was shown; default "
                           "the current one."),
    "ip": Str(min_length=1, max_length=64, nullable=True,
              description="The person's IP address when they chose, if known (proof)."),
    "user_agent": Str(min_length=1, max_length=1000, nullable=True),
}, required=("topic", "channel", "state", "source", "actor"), name="ConsentRequest")

SuppressionRequest = Obj({
    "customer": CustomerRef,
    "address": Str(min_length=3, max_length=320, description="Email or phone number."),
    "channel": Channel,
    "reason": Str(enum=("hard_bounce", "complaint", "sms_stop", "manual")),
}, required=("channel", "reason"), one_of=(("customer",), ("address",)), one_of_at="address",
    name="SuppressionRequest", description="Name the person by customer or by address.")

InboundSms = Obj({
    "from": Str(min_length=3, max_length=32),
    "body": Str(max_length=1600),
}, required=("from", "body"), name="InboundSms")

UnsubscribeLinkRequest = Obj({"customer": CustomerRef, "topic": Topic, "channel": Channel},
                             required=("customer", "topic", "channel"),
                             name="UnsubscribeLinkRequest")

WebhookCreate = Obj({
    "url": Str(min_length=8, max_length=2000, pattern=f"https?://{URL_CHAR}+",
               example="https://hooks.example.com/carnet"),
    "events": Arr(Str(min_length=1, max_length=64, pattern=r"\*|[a-z_]+\.(\*|[a-z_]+)"),
                  min_items=1, max_items=50, example=["consent.*", "suppression.added"]),
    "description": Str(max_length=200, nullable=True),
}, required=("url", "events"), name="WebhookCreate")
