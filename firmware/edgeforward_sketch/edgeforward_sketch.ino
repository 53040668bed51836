// edgeforward store-and-forward sketch: a ring of readings, each freed only when the gateway says "ACK <seq>".
// Port config: ack = true (and reset_on_open = false for an Uno, Nano or Mega: see the README).
// Capacity: RING readings, so RING * INTERVAL_MS of outage (64 s at the default 1 reading/s); beyond that the
// oldest unacknowledged reading is overwritten. Wire format: "v1=<temp> seq=<n> ms=<millis at reading>\r\n".
#ifndef INTERVAL_MS
#define INTERVAL_MS 1000UL                              // one reading per second
#endif
const uint8_t RING = 64;
const unsigned long RESEND_MIN_MS = 2000;              // a reading not acknowledged this long after its send...
const unsigned long RESEND_MAX_MS = 32000;             // ...is resent, waiting twice as long each time no ACK comes

struct Reading { uint32_t seq; uint32_t ms; float temp; unsigned long sentAt; bool used; };
Reading ring[RING];
uint32_t nextSeq = 1;
unsigned long resendAfter = RESEND_MIN_MS;
bool ackedSinceResend = true;
char rx[16];
uint8_t rxLen = 0;

void sendReading(Reading &r) {
  Serial.print("v1="); Serial.print(r.temp, 2);
  Serial.print(" seq="); Serial.print(r.seq);
  Serial.print(" ms="); Serial.println(r.ms);          // println ends with \r\n
  r.sentAt = millis();
}

void take(float temp) {                                 // the oldest entry is overwritten when full
  Reading &r = ring[nextSeq % RING];
  r = { nextSeq++, millis(), temp, 0, true };
  sendReading(r);                                       // lost if the gateway is away: resent below
}

void onAck(uint32_t seq) {
  Reading &r = ring[seq % RING];
  if (r.used && r.seq == seq) r.used = false;
  resendAfter = RESEND_MIN_MS;                          // the gateway is back: resend the rest soon
  ackedSinceResend = true;
}

void readAcks() {                                       // "ACK 42\n"
  while (Serial.available()) {
    char c = (char)Serial.read();
    if (c == '\n') {
      rx[rxLen] = '\0';
      if (strncmp(rx, "ACK ", 4) == 0) onAck(strtoul(rx + 4, NULL, 10));
      rxLen = 0;
    } else if (rxLen < sizeof(rx) - 1) {
      rx[rxLen++] = c;
    }
  }
}

void resendDue() {                                      // unacknowledged readings, oldest first
  bool resent = false;
  for (uint32_t s = nextSeq - RING; s != nextSeq; s++) {
    Reading &r = ring[s % RING];
    if (r.used && r.seq == s && millis() - r.sentAt >= resendAfter) { sendReading(r); resent = true; }
  }
  if (resent) {
    if (!ackedSinceResend && resendAfter < RESEND_MAX_MS) resendAfter *= 2;   // nobody listens: back off
    ackedSinceResend = false;
  }
}

void setup() { Serial.begin(115200); }

void loop() {
  static unsigned long last = 0;
  if (millis() - last >= INTERVAL_MS) { last = millis(); take(analogRead(A0) * 0.1); }
  readAcks();
  resendDue();
}
