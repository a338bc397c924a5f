// A small embedded list of passwords seen again and again in breach corpora (those of 12 or more
// characters, since shorter ones fail the length rule anyway), plus the sequences they are built
// from. Enough to refuse the obvious; a breach-corpus lookup would need a network or a large file.

const COMMON = new Set([
  "123456789012",
  "1234567890123",
  "12345678901234",
  "123456789123",
  "123123123123",
  "111111111111",
  "000000000000",
  "123456123456",
  "qwertyuiop12",
  "qwertyuiop123",
  "qwerty123456",
  "qwerty12345678",
  "1q2w3e4r5t6y",
  "1qaz2wsx3edc",
  "zaq12wsxcde3",
  "q1w2e3r4t5y6",
  "password1234",
  "password12345",
  "password123456",
  "passwordpassword",
  "password1234567",
  "p@ssw0rd1234",
  "p@ssword1234",
  "passw0rd1234",
  "iloveyou1234",
  "iloveyouforever",
  "letmein12345",
  "welcome12345",
  "welcome123456",
  "administrator",
  "administrator1",
  "admin1234567",
  "admin123456789",
  "adminadmin123",
  "changeme1234",
  "changemenow!",
  "trustno1trustno1",
  "football1234",
  "baseball1234",
  "basketball12",
  "superman1234",
  "starwars1234",
  "monkey123456",
  "dragon123456",
  "sunshine1234",
  "princess1234",
  "qazwsxedcrfv",
  "asdfghjkl123",
  "zxcvbnm12345",
  "abcdefghijkl",
  "abcd12345678",
  "abc123456789",
  "michael12345",
  "jennifer1234",
  "computer1234",
  "internet1234",
  "whatever1234",
  "mypassword123",
  "secretpassword",
  "correcthorsebatterystaple",
  "gridtokenx123",
  "gridtokenx1234",
]);

// Keyboard rows and digit runs, forwards and backwards, repeated so wrapped runs match.
const SEQUENCES = [
  "1234567890".repeat(4),
  "0987654321".repeat(4),
  "abcdefghijklmnopqrstuvwxyz".repeat(2),
  "qwertyuiopasdfghjklzxcvbnm".repeat(2),
  "mnbvcxzlkjhgfdsapoiuytrewq".repeat(2),
  "qazwsxedcrfvtgbyhnujmikolp".repeat(2),
];

/** Whether `password` is on the embedded list or is one keyboard or digit run (case ignored). */
export function isCommonPassword(password: string): boolean {
  const folded = password.toLowerCase();
  if (COMMON.has(folded)) return true;
  return SEQUENCES.some((run) => run.includes(folded));
}
