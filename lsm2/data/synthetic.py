"""Synthetic wearable subject-days for the 26 LSM-2 channels, with known mechanisms.

Every subject has latent traits (age, sex, BMI, fitness, resting HR, HRV and
EDA baselines, chronotype, wear habits, hypertension, anxiety). A subject's
whole recording is generated as one minute timeline (so nights cross midnight
continuously) from latent states: sleep periods with stages, activity bouts of
10 types plus light everyday walking, and an arousal process. Channels are
coupled through these states:

  HR rises with activity (lagged) and arousal and falls in sleep (the nocturnal
  dip); HRV moves inversely to HR and is higher in deep sleep; steps and the
  accelerometer features follow the activity type and intensity; skin
  temperature follows the circadian rhythm and sleep and dips in exercise; EDA
  follows arousal (tonic level and phasic responses) and sweat.

Labels with a known mechanism: hypertension reduces the nocturnal HR dip and
night-time HRV (with only small daytime effects), so it is mostly visible at
night; anxiety raises EDA (level and responses) and daytime HR through more
arousal episodes; the minute label `activity_bouts` gives the bout type at
every minute inside an exercise bout (-1 elsewhere: light walking, rest,
sleep) and the day's `activity` label is its dominant bout type (the most
frequent class of its `activity_bouts` minutes); age and BMI shape resting HR,
HRV and fitness. Labels describe what the person did, whether or not the
watch was worn at the time.

Missingness is natural and not at random: off-wrist episodes (nights without
the watch, charging, showers, other removals), partial first/last days, PPG
loss in motion and poor perfusion, HRV invalid when `hrv_percent_good` < 20,
EDA invalid without skin contact, whole-sensor outages. Per-subject wear habits
spread the per-day missing fraction over roughly 10%..90% (median near 50%).

Every channel gets additive Gaussian observation noise with the known
`NOISE_STD` (before clipping to the channel's validity range), so the best
achievable reconstruction error is known. A subject's data depend only on
(seed, subject index): deterministic and independent of how many subjects are
generated.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools

import numpy as np
from scipy import signal as sp_signal

from lsm2.data.channels import DEFAULT_CHANNELS
from lsm2.data.metadata import LabelSpec
from lsm2.data.record import MINUTES_PER_DAY, DayRecord

T_DAY = MINUTES_PER_DAY
CHANNEL_INDEX = {c.name: i for i, c in enumerate(DEFAULT_CHANNELS)}


@dataclasses.dataclass(frozen=True)
class ActivityProfile:
  """Per-minute signature of an activity type at full intensity."""
  met: float  # Metabolic equivalent.
  cadence: float  # Steps per minute.
  jerk: float
  zero_cross: float  # Accelerometer zero crossings per minute.
  kurtosis: float  # Impulsiveness of wrist motion.
  altim: float  # Altimeter variability (m).
  axis: float  # Mean wrist orientation (g).
  energy_ratio: float
  covariance: float
  ppg_loss: float  # Chance per minute that motion breaks the PPG signal.
  minutes: tuple[int, int]  # Bout duration range.


ACTIVITY_PROFILES: dict[str, ActivityProfile] = {
    "walking": ActivityProfile(3.5, 110, 2.0, 120, 3.5, 0.3, 0.30, 0.5, 0.05, 0.15, (20, 60)),
    "running": ActivityProfile(9.0, 165, 6.0, 170, 4.5, 0.6, 0.20, 1.5, 0.15, 0.50, (20, 60)),
    "cycling": ActivityProfile(7.0, 5, 1.2, 60, 5.0, 1.0, 0.80, -0.5, -0.05, 0.25, (30, 90)),
    "strength": ActivityProfile(5.0, 10, 4.0, 40, 9.0, 0.05, -0.20, 0.0, 0.30, 0.60, (30, 60)),
    "yoga": ActivityProfile(2.5, 2, 0.6, 20, 6.0, 0.02, -0.50, -1.0, 0.20, 0.10, (30, 75)),
    "hiit": ActivityProfile(8.0, 90, 7.0, 140, 7.0, 0.2, 0.00, 1.0, 0.25, 0.60, (15, 40)),
    "hiking": ActivityProfile(6.0, 100, 2.5, 100, 4.0, 3.0, 0.35, 0.6, 0.08, 0.20, (60, 180)),
    "dancing": ActivityProfile(5.0, 80, 4.5, 130, 5.0, 0.1, 0.10, 0.8, 0.20, 0.35, (20, 90)),
    "tennis": ActivityProfile(7.0, 60, 6.5, 90, 12.0, 0.1, 0.15, 0.9, 0.30, 0.50, (45, 120)),
    "rowing": ActivityProfile(7.5, 3, 3.0, 50, 4.0, 0.05, 0.60, -0.2, -0.25, 0.35, (20, 60)),
}
ACTIVITY_TYPES: tuple[str, ...] = tuple(ACTIVITY_PROFILES)
_LIGHT = ActivityProfile(2.5, 85, 1.5, 100, 3.5, 0.2, 0.30, 0.4, 0.05, 0.10, (1, 10))
_REST = ActivityProfile(1.3, 0, 0.3, 15, 3.2, 0.05, 0.10, -0.5, 0.02, 0.0, (0, 0))
LIGHT, REST = len(ACTIVITY_TYPES), len(ACTIVITY_TYPES) + 1
# Rows: the activity types, then light everyday walking, then rest.
_PROFILE_TABLE = {f.name: np.array([getattr(p, f.name) for p in
                                    (*ACTIVITY_PROFILES.values(), _LIGHT, _REST)], np.float64)
                  for f in dataclasses.fields(ActivityProfile) if f.name != "minutes"}

NOISE_STD: dict[str, float] = {
    "hr": 1.5, "hrv_shannon_entropy_rr": 0.08, "hrv_shannon_entropy_rrd": 0.08,
    "rmssd_percentile_0595": 3.0, "sdnn_percentile_0595": 3.0, "hrv_percent_good": 4.0,
    "hrv_rr_80th_percentile_mean": 15.0, "hrv_rr_20th_percentile_mean": 15.0,
    "hrv_rr_median": 10.0, "hr_at_rest_mean": 0.8, "eda_level_real": 0.05,
    "leads_contact_counts": 2.0, "ceda_slope_real_micro_siemens": 0.02, "steps": 3.0,
    "jerk_auto": 0.15, "log_energy": 0.15, "covariance": 0.02, "log_energy_ratio": 0.1,
    "zero_crossing_std": 3.0, "zero_crossing_avg": 4.0, "axis_mean": 0.03, "altim_std": 0.03,
    "kurtosis": 0.3, "sleep_coefficient": 3.0, "wrist_temperatures": 0.1,
    "skin_temperature_slope": 0.01,
}
NOISE_STD_VECTOR = np.array([NOISE_STD[c.name] for c in DEFAULT_CHANNELS], np.float32)

HRV_CHANNELS = ("hrv_shannon_entropy_rr", "hrv_shannon_entropy_rrd", "rmssd_percentile_0595",
                "sdnn_percentile_0595", "hrv_rr_80th_percentile_mean",
                "hrv_rr_20th_percentile_mean", "hrv_rr_median")
HRV_MIN_PERCENT_GOOD = 20.0  # The reference's validity rule for HRV features.
EDA_MIN_CONTACT = 30.0  # EDA level/slope need this many contact counts per minute.

LABEL_SPECS: tuple[LabelSpec, ...] = (
    LabelSpec("hypertension", "binary", "subject", ("no", "yes")),
    LabelSpec("anxiety", "binary", "subject", ("no", "yes")),
    LabelSpec("age", "regression", "subject"),
    LabelSpec("bmi", "regression", "subject"),
    LabelSpec("sex", "binary", "subject", ("female", "male")),
    LabelSpec("activity", "categorical", "day", ACTIVITY_TYPES),
    LabelSpec("activity_bouts", "categorical", "minute", ACTIVITY_TYPES),
)
_EPOCH = datetime.date(2024, 1, 1)


@dataclasses.dataclass(frozen=True)
class SubjectTraits:
  """Latent per-subject traits (the generator's ground truth)."""
  age: float
  sex: int  # 0 female, 1 male.
  bmi: float
  fitness: float
  hypertension: bool
  anxiety: bool
  resting_hr: float
  max_hr: float
  rmssd_base: float
  nocturnal_dip: float  # Fractional HR drop in sleep.
  night_hrv_factor: float
  eda_base: float
  scr_rate: float  # Phasic EDA responses per minute at rest.
  temp_base: float
  sleep_onset: float  # Minutes after midnight (may exceed 1440).
  sleep_minutes: float
  compliance: float  # 0..1 wear habit: low = watch often off.
  ppg_quality: float
  eda_contact: float
  bout_rate: float  # Mean exercise bouts per day.
  preferences: tuple[float, ...]  # Probability of each activity type.


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def sample_traits(rng: np.random.Generator) -> SubjectTraits:
  """Draws one subject's latent traits."""
  age = rng.uniform(20, 80)
  sex = int(rng.random() < 0.5)
  bmi = float(np.clip(rng.normal(26 + 0.04 * (age - 50) + 0.5 * sex, 4.5), 17, 48))
  fitness = rng.normal() - 0.02 * (age - 50) - 0.08 * (bmi - 26)
  hypertension = bool(rng.random() < _sigmoid(-1.2 + 0.06 * (age - 50) + 0.12 * (bmi - 26)))
  anxiety = bool(rng.random() < _sigmoid(-1.0 + 0.4 * (1 - sex)))
  resting_hr = float(np.clip(66 - 4 * fitness + 0.25 * (bmi - 26) + 2.0 * anxiety
                             + 1.0 * hypertension + rng.normal(0, 3), 45, 92))
  rmssd = float(np.exp(rng.normal(np.log(42) - 0.012 * (age - 40) + 0.08 * fitness, 0.25)))
  dip = float(np.clip(rng.normal(0.06 if hypertension else 0.12, 0.025), 0.0, 0.25))
  compliance = float(rng.beta(1.3, 1.5))
  return SubjectTraits(
      age=float(age), sex=sex, bmi=bmi, fitness=float(fitness), hypertension=hypertension,
      anxiety=anxiety, resting_hr=resting_hr, max_hr=208 - 0.7 * age, rmssd_base=rmssd,
      nocturnal_dip=dip, night_hrv_factor=0.8 if hypertension else 1.0,
      eda_base=float(np.exp(rng.normal(np.log(1.5), 0.45)) * (1.3 if anxiety else 1.0)),
      scr_rate=0.05 + (0.06 if anxiety else 0.0),
      temp_base=float(rng.normal(33.3, 0.5)),
      sleep_onset=float(rng.normal(23 * 60, 50)),
      sleep_minutes=float(np.clip(rng.normal(7.3 * 60 - 20 * anxiety, 45), 300, 600)),
      compliance=compliance, ppg_quality=float(rng.beta(5, 2)), eda_contact=float(rng.beta(4, 2)),
      bout_rate=float(np.clip(1.2 + 0.5 * fitness, 0.3, 3.0)),
      preferences=tuple(rng.dirichlet(np.full(len(ACTIVITY_TYPES), 0.6))))


def _smooth_noise(rng: np.random.Generator, n: int, tau: float) -> np.ndarray:
  """Unit-variance AR(1) noise with time constant `tau` minutes."""
  a = np.exp(-1.0 / tau)
  white = rng.standard_normal(n)
  white[0] /= np.sqrt(1 - a * a)  # Start in the stationary distribution.
  return sp_signal.lfilter([np.sqrt(1 - a * a)], [1, -a], white)


def _lag(x: np.ndarray, tau: float) -> np.ndarray:
  """First-order low-pass (a physiological response lag of `tau` minutes)."""
  a = np.exp(-1.0 / tau)
  return sp_signal.lfilter([1 - a], [1, -a], x, zi=[a * x[0]])[0]


def _episodes(rng, mask, count, lo, hi, dur_lo, dur_hi, n):
  """Sets `count` random [start, start+duration) windows with start in [lo, hi) to True."""
  for _ in range(count):
    if hi <= lo:
      return
    s = int(rng.integers(lo, hi))
    mask[max(s, 0):min(s + int(rng.integers(dur_lo, dur_hi + 1)), n)] = True


class _Timeline:
  """The latent minute-level states of one subject's whole recording."""

  def __init__(self, traits: SubjectTraits, days: int, rng: np.random.Generator):
    n = days * T_DAY
    self.n = n
    self.asleep = np.zeros(n, bool)
    self.deep = np.zeros(n, bool)
    self.rem = np.zeros(n, bool)
    self.nights: list[tuple[int, int]] = []
    # Nights -1 .. days-1; night k starts in the evening of day k.
    for k in range(-1, days):
      onset = int(k * T_DAY + traits.sleep_onset + rng.normal(0, 40))
      wake = int(onset + traits.sleep_minutes + rng.normal(0, 45))
      self.nights.append((onset, wake))
      lo, hi = max(onset, 0), min(wake, n)
      if hi <= lo:
        continue
      tau = np.arange(lo - onset, hi - onset)
      cycle = rng.normal(90, 8)
      pos, idx = (tau % cycle) / cycle, tau // cycle
      self.asleep[lo:hi] = True
      self.deep[lo:hi] = (pos > 0.15) & (pos < 0.45) & (idx < 3 + rng.integers(0, 2))
      self.rem[lo:hi] = (pos > 0.78) & (idx >= 1)
      # Brief awakenings, more frequent with anxiety.
      wake_bits = np.zeros(hi - lo, bool)
      _episodes(rng, wake_bits, rng.poisson(3 + 4 * traits.anxiety), 0, hi - lo, 2, 8, hi - lo)
      self.asleep[lo:hi] &= ~wake_bits
      self.deep[lo:hi] &= ~wake_bits
      self.rem[lo:hi] &= ~wake_bits
    awake_windows = [(max(self.nights[d][1], d * T_DAY), min(self.nights[d + 1][0], (d + 1) * T_DAY))
                     for d in range(days)]
    self.awake_windows = awake_windows

    # Activity: exercise bouts (they define the labels) and light everyday walking.
    self.activity = np.full(n, REST, np.int64)
    self.intensity = np.ones(n)
    self.bout = np.zeros(n, bool)
    prefs = np.asarray(traits.preferences)
    for d, (lo, hi) in enumerate(awake_windows):
      light = np.zeros(n, bool)
      _episodes(rng, light, rng.poisson(22), lo + 10, hi - 10, 1, 10, n)
      self.activity[light] = LIGHT
      for _ in range(max(1, rng.poisson(traits.bout_rate))):
        k = int(rng.choice(len(ACTIVITY_TYPES), p=prefs))
        dmin, dmax = ACTIVITY_PROFILES[ACTIVITY_TYPES[k]].minutes
        dur = int(rng.integers(dmin, dmax + 1))
        if hi - lo < dur + 60:
          dur = max((hi - lo) // 3, 5)
        s = int(rng.integers(lo + 30, max(hi - dur - 30, lo + 31)))
        e = min(s + dur, n)
        self.activity[s:e] = k
        self.intensity[s:e] = np.clip(rng.normal(1.0, 0.12), 0.6, 1.4)
        self.bout[s:e] = True
    self.activity[self.asleep] = REST
    self.bout &= ~self.asleep
    # What is left of the bouts (later ones overwrite earlier ones, sleep overwrites all).
    self.bout_labels = np.where(self.bout & (self.activity < len(ACTIVITY_TYPES)),
                                self.activity, -1)
    per_day = self.bout_labels.reshape(days, T_DAY)
    counts = np.stack([np.bincount(row[row >= 0], minlength=len(ACTIVITY_TYPES))
                       for row in per_day])
    self.day_activity = np.where(counts.any(axis=1), counts.argmax(axis=1), -1)

    # Arousal: slow fluctuations plus stress episodes (more with anxiety), low in sleep.
    arousal = 0.6 * _smooth_noise(rng, n, 45.0)
    stress = np.zeros(n, bool)
    for lo, hi in awake_windows:
      _episodes(rng, stress, rng.poisson(2.5 if traits.anxiety else 1.0), lo, hi, 20, 60, n)
    arousal += 1.2 * stress + (0.25 if traits.anxiety else 0.0)
    arousal -= 1.0 * (self.asleep & ~self.rem)
    self.arousal = arousal


def _generate_channels(traits: SubjectTraits, tl: _Timeline,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Returns clean latent channels float64[n, 26] and the metabolic equivalent float64[n]."""
  n = tl.n
  prof = {k: v[tl.activity] for k, v in _PROFILE_TABLE.items()}
  met = 1.0 + (prof["met"] - 1.0) * tl.intensity
  met[tl.asleep] = 1.0
  exertion = np.clip(met - 1.3, 0, None)
  awake = ~tl.asleep
  minute_of_day = np.arange(n) % T_DAY
  x = np.zeros((n, len(DEFAULT_CHANNELS)))
  ch = CHANNEL_INDEX

  # --- Heart rate and HRV.
  rhr = traits.resting_hr + np.repeat(rng.normal(0, 1.5, n // T_DAY), T_DAY)
  reserve = np.clip(0.11 * exertion * (1 - 0.08 * traits.fitness), 0, 0.95)
  hr_target = rhr + 7.0 * awake + reserve * (traits.max_hr - rhr) + 3.0 * tl.arousal
  hr_target += 2.0 * (traits.anxiety & awake)
  sleep_hr = rhr * (1 - traits.nocturnal_dip) - 2.0 * tl.deep + 3.0 * tl.rem
  hr_target = np.where(tl.asleep, sleep_hr, hr_target)
  hr = _lag(hr_target, 2.0) + 1.5 * _smooth_noise(rng, n, 10.0)
  x[:, ch["hr"]] = hr
  sleep_factor = np.where(tl.deep, 1.35, np.where(tl.rem, 0.95, 1.15))
  rmssd = traits.rmssd_base * np.exp(-0.035 * (hr - rhr)) * np.exp(0.12 * _smooth_noise(rng, n, 20))
  rmssd = np.where(tl.asleep, rmssd * sleep_factor * traits.night_hrv_factor, rmssd)
  sdnn = 1.3 * rmssd + 12 + 2.0 * _smooth_noise(rng, n, 30)
  rr = 60000.0 / hr
  x[:, ch["rmssd_percentile_0595"]] = rmssd
  x[:, ch["sdnn_percentile_0595"]] = sdnn
  x[:, ch["hrv_shannon_entropy_rr"]] = 2.0 + 0.8 * np.log(np.maximum(sdnn, 1) / 25)
  x[:, ch["hrv_shannon_entropy_rrd"]] = 1.7 + 0.8 * np.log(np.maximum(rmssd, 1) / 25)
  x[:, ch["hrv_rr_median"]] = rr
  x[:, ch["hrv_rr_80th_percentile_mean"]] = rr + 0.5 * sdnn
  x[:, ch["hrv_rr_20th_percentile_mean"]] = rr - 0.5 * sdnn
  motion_penalty = exertion * (1 + 2 * prof["ppg_loss"])
  quality = 1.6 + 3.0 * (traits.ppg_quality - 0.7) + 0.7 * _smooth_noise(rng, n, 15)
  percent_good = 100 * _sigmoid(quality - 0.9 * motion_penalty + 0.8 * tl.asleep)
  x[:, ch["hrv_percent_good"]] = percent_good
  rest = (met < 1.6)
  kernel = np.ones(60)
  rest_sum = np.convolve(hr * rest, kernel, "same")
  rest_n = np.convolve(rest.astype(float), kernel, "same")
  x[:, ch["hr_at_rest_mean"]] = np.where(rest_n > 0, rest_sum / np.maximum(rest_n, 1), rhr)

  # --- EDA.
  contact = 60 * traits.eda_contact * (1 - 0.35 * np.tanh(exertion / 3))
  contact = contact + 12 * _smooth_noise(rng, n, 30) + 10 * tl.asleep
  x[:, ch["leads_contact_counts"]] = np.clip(contact, 0, 100)
  sweat = _lag(0.25 * exertion, 15.0)
  tonic = traits.eda_base * np.exp(0.35 * tl.arousal) * np.where(tl.asleep, 0.7, 1.0) + sweat
  tonic = _lag(tonic, 5.0)
  scr = rng.poisson(traits.scr_rate * (1 + np.clip(tl.arousal, 0, None))) * rng.exponential(0.3, n)
  eda = tonic + _lag(scr, 2.0)
  x[:, ch["eda_level_real"]] = eda
  x[:, ch["ceda_slope_real_micro_siemens"]] = np.diff(eda, prepend=eda[0])

  # --- Accelerometer.
  stepping = prof["cadence"] * tl.intensity * awake
  x[:, ch["steps"]] = stepping * np.clip(rng.normal(1.0, 0.08, n), 0.5, 1.5)
  energy = 0.01 + 0.12 * exertion ** 1.5 + 0.03 * awake
  x[:, ch["log_energy"]] = np.log(energy) + 0.2 * _smooth_noise(rng, n, 5)
  x[:, ch["jerk_auto"]] = prof["jerk"] * tl.intensity * awake + 0.05 + 0.1 * awake
  zc = prof["zero_cross"] * awake + 5
  x[:, ch["zero_crossing_avg"]] = zc
  x[:, ch["zero_crossing_std"]] = 0.3 * zc + 5
  posture = np.zeros(n)
  for onset, wake in tl.nights:  # Sleeping positions change at random turns.
    lo, hi = max(onset, 0), min(wake, n)
    s = lo
    while s < hi:
      e = min(s + int(rng.integers(30, 120)), hi)
      posture[s:e] = rng.choice([-0.7, -0.2, 0.4])
      s = e
  axis = np.where(tl.asleep, posture, prof["axis"] + 0.1 * _smooth_noise(rng, n, 20))
  x[:, ch["axis_mean"]] = axis
  x[:, ch["altim_std"]] = prof["altim"] * awake + 0.03
  x[:, ch["kurtosis"]] = prof["kurtosis"] + 0.3 * _smooth_noise(rng, n, 10)
  x[:, ch["covariance"]] = prof["covariance"] + 0.02 * _smooth_noise(rng, n, 10)
  x[:, ch["log_energy_ratio"]] = prof["energy_ratio"]
  x[:, ch["sleep_coefficient"]] = 100 * _sigmoid(4.0 * tl.asleep - 2.0 - 1.5 * exertion
                                                 + 1.0 * tl.deep)

  # --- Temperature: circadian rhythm (peak at night), sleep warming, exercise cooling.
  circadian = np.cos(2 * np.pi * (minute_of_day - (traits.sleep_onset + 200)) / T_DAY)
  temp = (traits.temp_base + 0.4 * circadian + _lag(1.3 * tl.asleep, 30.0)
          - _lag(0.6 * np.tanh(exertion / 3), 8.0) + 0.3 * _smooth_noise(rng, n, 60))
  x[:, ch["wrist_temperatures"]] = temp
  x[:, ch["skin_temperature_slope"]] = np.diff(temp, prepend=temp[0])

  return x, met


def _worn(traits: SubjectTraits, tl: _Timeline, rng: np.random.Generator) -> np.ndarray:
  """bool[n]: the watch is on the wrist (wear habits, partial first/last days)."""
  n = tl.n
  off = np.zeros(n, bool)
  lack = 1.0 - traits.compliance
  if rng.random() < 0.7:  # The watch is put on during the first day...
    off[:int(rng.uniform(8, 18) * 60)] = True
  if rng.random() < 0.7 and n > T_DAY:  # ...and returned during the last one.
    off[n - T_DAY + int(rng.uniform(6, 22) * 60):] = True
  for onset, wake in tl.nights:  # Nights without the watch.
    if rng.random() < 0.95 * lack:
      off[max(onset - int(rng.integers(0, 90)), 0):max(min(wake + int(rng.integers(0, 60)), n), 0)] = True
  charge_at = rng.choice([7.5 * 60, 19.5 * 60, 13 * 60])
  removals = np.zeros(n, bool)
  for d, (lo, hi) in enumerate(tl.awake_windows):
    if rng.random() < 0.35 + 0.5 * lack:  # Charging.
      s = int(d * T_DAY + charge_at + rng.normal(0, 45))
      off[max(s, 0):min(s + int(rng.integers(30, 60 + 150 * lack)), n)] = True
    if rng.random() < 0.6:  # Shower after waking.
      _episodes(rng, off, 1, lo, lo + 60, 10, 25, n)
    # Other removals (desk work, sleeves, forgetting), longer for low compliance.
    for _ in range(rng.poisson(0.5 + 5.0 * lack)):
      s = int(rng.integers(lo, max(hi, lo + 1)))
      dur = int(np.clip(rng.lognormal(np.log(40 + 120 * lack), 0.8), 10, 600))
      removals[s:min(s + dur, n)] = True
  off |= removals & ~tl.bout  # People rarely take the watch off mid-workout.
  return ~off


def _observed_mask(traits: SubjectTraits, tl: _Timeline, x: np.ndarray, met: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
  """Natural missingness: off-wrist episodes and sensor-specific validity.

  `x` holds the noisy values as stored, so the validity rules (HRV needs
  hrv_percent_good >= 20, EDA needs contact) hold exactly in the data.
  """
  n = tl.n
  worn = _worn(traits, tl, rng)
  ch = CHANNEL_INDEX
  obs = np.repeat(worn[:, None], len(DEFAULT_CHANNELS), axis=1)
  outage = functools.partial(_day_outages, rng, n // T_DAY)
  # PPG: motion artifacts, poor perfusion episodes and whole-sensor outages.
  act = tl.activity
  motion_loss = rng.random(n) < _PROFILE_TABLE["ppg_loss"][act] * tl.intensity * (met > 1.5)
  perfusion = _smooth_noise(rng, n, 20) < -2.2 + 2.0 * (traits.ppg_quality - 0.7)
  ppg_ok = worn & ~motion_loss & ~perfusion & ~outage(0.05, 2, 10)
  ppg = [ch[c] for c in ("hr", "hrv_percent_good", "hr_at_rest_mean", *HRV_CHANNELS)]
  obs[:, ppg] &= ppg_ok[:, None]
  hrv_ok = x[:, ch["hrv_percent_good"]] >= HRV_MIN_PERCENT_GOOD
  obs[:, [ch[c] for c in HRV_CHANNELS]] &= hrv_ok[:, None]
  obs[:, ch["hr_at_rest_mean"]] &= met < 1.6
  # EDA: no value without skin contact; the sensor is sometimes off for a day.
  eda_on = ~outage(0.06, 24, 24)
  obs[:, ch["leads_contact_counts"]] &= eda_on
  eda_ok = eda_on & (x[:, ch["leads_contact_counts"]] >= EDA_MIN_CONTACT)
  obs[:, [ch["eda_level_real"], ch["ceda_slope_real_micro_siemens"]]] &= eda_ok[:, None]
  # Altimeter outages; slopes need the previous minute too.
  obs[:, ch["altim_std"]] &= ~outage(0.05, 6, 24)
  for slope, level in (("ceda_slope_real_micro_siemens", "eda_level_real"),
                       ("skin_temperature_slope", "wrist_temperatures")):
    prev = np.concatenate([[False], obs[:-1, ch[level]]])
    obs[:, ch[slope]] &= prev
  return obs


def _day_outages(rng, days: int, p: float, lo_hours: float, hi_hours: float) -> np.ndarray:
  """Per day with probability p, one outage of lo..hi hours (24 = the whole day)."""
  out = np.zeros(days * T_DAY, bool)
  for d in range(days):
    if rng.random() < p:
      dur = int(rng.uniform(lo_hours, hi_hours) * 60) if hi_hours > lo_hours else int(lo_hours * 60)
      s = d * T_DAY + int(rng.integers(0, max(T_DAY - dur, 0) + 1))
      out[s:s + dur] = True
  return out


def generate_subject(seed: int, index: int, days: int) -> tuple[SubjectTraits, list[DayRecord]]:
  """Generates `days` consecutive day records of subject `index` (deterministic per seed)."""
  if days < 1:
    raise ValueError(f"days must be >= 1, got {days}")
  rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
  traits = sample_traits(rng)
  tl = _Timeline(traits, days, rng)
  clean, met = _generate_channels(traits, tl, rng)
  noisy = clean + NOISE_STD_VECTOR * rng.standard_normal(clean.shape)
  lo = np.array([c.valid_min for c in DEFAULT_CHANNELS])
  hi = np.array([c.valid_max for c in DEFAULT_CHANNELS])
  noisy = np.clip(noisy, lo, hi).astype(np.float32)
  observed = _observed_mask(traits, tl, noisy, met, rng)
  noisy[~observed] = 0.0
  subject_id = f"synth{index:06d}"
  start = _EPOCH + datetime.timedelta(days=int(rng.integers(0, 365)))
  subject_labels = {"hypertension": int(traits.hypertension), "anxiety": int(traits.anxiety),
                    "age": round(traits.age, 1), "bmi": round(traits.bmi, 1), "sex": traits.sex}
  records = []
  for d in range(days):
    sl = slice(d * T_DAY, (d + 1) * T_DAY)
    records.append(DayRecord(
        subject_id=subject_id, day=(start + datetime.timedelta(days=d)).isoformat(),
        signals=noisy[sl], observed=observed[sl],
        labels={**subject_labels, "activity": int(tl.day_activity[d]),
                "activity_bouts": tl.bout_labels[sl]}))
  return traits, records
