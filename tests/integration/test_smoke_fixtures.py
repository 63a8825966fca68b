from tests.conftest import path_of, submit


def test_signup_verify_and_see_preferences(client, outbox):
    r = submit(client, "/signup", {"email": "Ann@Example.com", "password": "correct horse 1",
                                   "confirm": "correct horse 1"})
    assert r.status_code == 200
    assert "ann@example.com" in outbox.last()["To"]
    r = client.get(path_of(outbox.link(contains="/verify/")))
    assert r.status_code == 302
    page = client.get("/preferences").get_data(as_text=True)
    assert "Newsletter" in page
