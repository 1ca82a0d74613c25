// Who is in the open room and who is typing, from `ready`, `presence`, `typing` and
// `message` frames (docs/protocol.md). Presence events say how each person they name
// is now, and may repeat (a rename joins an id already listed, a person listed in
// `ready` may be announced just after it): everything is keyed by id.

export class People {
  /** @param {() => void} onChange called after anything shown changed */
  constructor(onChange) {
    this.onChange = onChange;
    this.you = null; // {id, name} of this connection
    this.members = new Map(); // id -> name
    this.typing = new Map(); // id -> {name, timer}
  }

  apply(frame) {
    switch (frame.type) {
      case "ready":
      case "resync":
        this.you = frame.you ?? this.you;
        if (frame.members) this.members = new Map(frame.members.map((person) => [person.id, person.name]));
        this.clearTyping();
        break;
      case "resumed":
        this.you = frame.you ?? this.you;
        break;
      case "presence":
        this.onPresence(frame);
        break;
      case "typing":
        this.onTyping(frame);
        break;
      case "message":
        this.stopTyping(frame.message?.author?.id);
        break;
      default:
        return;
    }
    this.onChange();
  }

  onPresence({ joined = [], left = [] }) {
    for (const person of joined) {
      this.members.set(person.id, person.name);
      if (person.id === this.you?.id) this.you = { ...this.you, name: person.name };
    }
    for (const person of left) {
      this.members.delete(person.id);
      this.stopTyping(person.id);
    }
  }

  onTyping({ person, active, expires_in: expiresIn }) {
    if (!person || person.id === this.you?.id) return;
    if (!active) {
      this.stopTyping(person.id);
      return;
    }
    clearTimeout(this.typing.get(person.id)?.timer);
    const timer = setTimeout(() => {
      this.typing.delete(person.id);
      this.onChange();
    }, (expiresIn ?? 6) * 1000);
    this.typing.set(person.id, { name: person.name, timer });
  }

  stopTyping(id) {
    clearTimeout(this.typing.get(id)?.timer);
    this.typing.delete(id);
  }

  clearTyping() {
    for (const { timer } of this.typing.values()) clearTimeout(timer);
    this.typing.clear();
  }

  /** Forget the room (another one is being opened). */
  clear() {
    this.you = null;
    this.members.clear();
    this.clearTyping();
    this.onChange();
  }

  /** "Alice is typing…", "Alice and Bob are typing…", "Several people are typing…". */
  get typingText() {
    const names = [...this.typing.values()].map((t) => t.name);
    if (names.length === 0) return "";
    if (names.length === 1) return `${names[0]} is typing…`;
    if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
    return "Several people are typing…";
  }
}
