"""The Django example without a node: Django's test client drives the views, and the
`taskrt_eager` fixture (taskrt's pytest plugin) runs `.delay()`'d tasks in-process, with
their arguments and result through JSON and their retries applied, as a node would.

    pip install django pytest-django -e ./python     # once, in a venv
    pytest examples/django                           # from the repo's root

GET /tasks/<id> reads the record with `taskrt.handle(id)`, which in eager mode finds the run of
that id in the eager session (an unknown id is `taskrt.NotFound`, as on a node).
"""

from __future__ import annotations

import json

import pytest

import taskrt
from chat import views
from chat.models import Message


@pytest.fixture(autouse=True)
def instant_llm(settings):
    settings.CHAT_FAKE_LLM_SECONDS = 0


def post(client, conversation_id, body):
    return client.post(
        f"/chat/{conversation_id}/messages",
        data=json.dumps(body) if not isinstance(body, (bytes, str)) else body,
        content_type="application/json",
    )


@pytest.mark.django_db
def test_a_message_enqueues_the_turn_and_the_task_stores_the_reply(client, taskrt_eager):
    response = post(client, "alice-1", {"text": "Which flats near the sea are free in May?"})

    assert response.status_code == 202, response.content
    task_id = response.json()["task_id"]
    (run,) = taskrt_eager.by_task("process_chat_message")
    assert run.id == task_id
    assert run.args == ["alice-1", "Which flats near the sea are free in May?"]
    assert run.state == "succeeded" and run.attempts == 1
    user, assistant = Message.objects.filter(conversation_id="alice-1")
    assert (user.role, user.task_id) == ("user", task_id)
    assert assistant.role == "assistant"
    assert assistant.task_id == task_id, "the reply names the task that wrote it"
    assert run.result == {
        "conversation_id": "alice-1",
        "reply": assistant.text,
        "message_id": assistant.id,
        "attempt": 0,
    }


@pytest.mark.django_db
def test_an_overloaded_llm_is_retried_when_it_says(client, taskrt_eager):
    response = post(client, "bob-2", {"text": "[busy] Is the one in Kyrenia free?"})

    assert response.status_code == 202, response.content
    (run,) = taskrt_eager.by_task("process_chat_message")
    assert run.state == "succeeded"
    assert run.attempts == 2
    assert run.retries == [1.0], "Retry(after=1.0): the delay asked for is recorded"
    assert run.result["attempt"] == 1
    assert Message.objects.filter(conversation_id="bob-2", role="assistant").count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "conversation_id, body, says",
    [
        ("alice-1", {"text": "   "}, "text: expected a non-empty string"),
        ("alice-1", {"text": 42}, "text: expected a non-empty string"),
        ("alice-1", {"text": "x" * 4001}, "text: 4001 characters, over 4000"),
        ("alice-1", b"{not json", "body: expected JSON"),
        ("alice-1", [1, 2], "text: expected a non-empty string"),
        ("a" * 65, {"text": "hi"}, "conversation_id: 1 to 64"),
        ("bad.id", {"text": "hi"}, "conversation_id: 1 to 64"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_enqueued(client, taskrt_eager, conversation_id, body, says):
    response = post(client, conversation_id, body)

    assert response.status_code == 400
    assert says in response.json()["error"]
    assert taskrt_eager.results == []
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_a_conversation_without_messages_fails_for_good_without_a_retry():
    with taskrt.eager(propagate=False) as session:
        outcome = views.process_chat_message.delay("nobody-9", "hello")

    assert outcome.state == "dead"
    assert outcome.attempts == 1, "Permanent: no retry"
    assert isinstance(outcome.exception, taskrt.Permanent)
    assert "has no user message" in outcome.error
    assert session.results == [outcome]


@pytest.mark.django_db
def test_the_result_is_read_back_by_id(client, taskrt_eager):
    task_id = post(client, "alice-1", {"text": "Hello"}).json()["task_id"]

    response = client.get(f"/tasks/{task_id}")

    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["id"] == task_id
    assert (answer["task"], answer["state"], answer["attempts"]) == (
        "process_chat_message",
        "succeeded",
        1,
    )
    assert answer["result"]["reply"] == Message.objects.get(role="assistant").text
    assert "error" not in answer


@pytest.mark.django_db
def test_a_dead_task_is_read_back_with_the_first_line_of_its_error(client):
    with taskrt.eager(propagate=False):
        failed = views.process_chat_message.delay("nobody-9", "hello")
        response = client.get(f"/tasks/{failed.id}")

    assert response.status_code == 200, response.content
    answer = response.json()
    assert (answer["state"], answer["attempts"], answer["result"]) == ("dead", 1, None)
    assert answer["error"] == "Permanent: conversation 'nobody-9' has no user message"


@pytest.mark.django_db
def test_unknown_and_malformed_task_ids(client, taskrt_eager):
    assert client.get("/tasks/no-such-task").status_code == 404
    assert "no task no-such-task" in client.get("/tasks/no-such-task").json()["error"]
    response = client.get("/tasks/" + "x" * 300)
    assert response.status_code == 400
    assert "over the limit of 256" in response.json()["error"]


@pytest.mark.django_db
def test_an_unreachable_node_is_a_503_naming_no_secret(client):
    # A port nothing listens on (the discard port, refused on loopback).
    unreachable = taskrt.Client("http://127.0.0.1:9", token="s3cret-token", timeout=2.0)
    taskrt.configure(client=unreachable)
    try:
        with taskrt.eager(False):  # through the client, whatever TASKRT_EAGER says
            response = client.get("/tasks/some-id")
    finally:
        taskrt.configure(client=None)
        unreachable.close()

    assert response.status_code == 503
    assert "s3cret-token" not in response.content.decode()
